"""Every disposition: the decisions as tables, then each action carried out on real files over the in-memory store.

``for_existing`` is a table over job state x same name x the job's input present x owner alive (32 rows), plus the
rows that hang on what the job records (an archive path, a quarantine, the time it failed, a replaced file);
``after_run`` is a table over the outcome of a run. :meth:`Mover.carry_out` then does each of the 8 actions to files
in temp folders; no threads, no inotify, no sleeps.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path, PurePosixPath

import pytest

from daemon.config import Rule
from daemon.dispositions import (
    Action,
    Archive,
    Follow,
    Keep,
    LeaveToOwner,
    Mover,
    Policy,
    Quarantine,
    Requeue,
    RetryAt,
    Wait,
    after_run,
    for_existing,
)
from daemon.errors import DecodeError, DiskFullError, InputChangedError
from daemon.fsops import FileId, Root
from daemon.jobs import Job, JobSpec, MemoryStore
from models.errors import OutOfMemoryError
from tests.conftest import FakeClock

T0 = FakeClock().start
POLICY = Policy(max_attempts=3, retry_seconds=30.0, retry_max_seconds=600.0, stale_seconds=30.0)
RULE = Rule(model="nearest", scale=2)
OWN = PurePosixPath("photos/a.png")  # the job's input
OTHER = PurePosixPath("photos/b.png")  # a file with the same content under another name
ID = FileId(1, 100)


def job(state: str, **changes: object) -> Job:
    """A job of ``state`` for ``photos/a.png``: a done one records its archive path; a failed one failed at T0."""
    base = Job(
        id=7,
        sha="0" * 64,
        fingerprint=RULE.fingerprint(),
        state=state,
        rule=RULE,
        rel=OWN,
        input_path="/in/photos/a.png",
        input_id=ID,
        worker="host:1/w" if state != "pending" else None,
        input_moved_to="/archive/photos/a.png" if state == "done" else None,
        error_kind="decode" if state == "failed" else None,
        error="not an image" if state == "failed" else None,
        finished_at=T0 if state in ("done", "failed") else None,
    )
    return dataclasses.replace(base, **changes)


# --- for_existing: job state x same name x input present x owner alive ----------------------------------------------
ARCHIVE_COMMITTED = Archive(None, reserved=True)
QUARANTINE = Quarantine("decode", "not an image")
TABLE = [
    # state      same   present alive  -> action
    ("done", True, True, True, ARCHIVE_COMMITTED),
    ("done", True, True, False, ARCHIVE_COMMITTED),
    ("done", True, False, True, ARCHIVE_COMMITTED),
    ("done", True, False, False, ARCHIVE_COMMITTED),
    ("done", False, True, True, Archive(OTHER)),  # a duplicate: archived under its own name
    ("done", False, True, False, Archive(OTHER)),
    ("done", False, False, True, Archive(OTHER)),
    ("done", False, False, False, Archive(OTHER)),
    ("failed", True, True, True, LeaveToOwner()),  # failed a moment ago: its live worker is moving it
    ("failed", True, True, False, QUARANTINE),  # its worker died between the commit and the move
    ("failed", True, False, True, LeaveToOwner()),
    ("failed", True, False, False, QUARANTINE),
    ("failed", False, True, True, Requeue()),  # the same content dropped again: another try
    ("failed", False, True, False, Requeue()),
    ("failed", False, False, True, Requeue()),
    ("failed", False, False, False, Requeue()),
    ("pending", True, True, True, Wait()),
    ("pending", True, True, False, Wait()),
    ("pending", True, False, True, Wait()),
    ("pending", True, False, False, Wait()),
    ("pending", False, True, True, Wait()),  # a duplicate waits for the job to end
    ("pending", False, True, False, Wait()),
    ("pending", False, False, True, Follow()),  # the input was renamed while it waited
    ("pending", False, False, False, Follow()),
    ("running", True, True, True, Wait()),
    ("running", True, True, False, Wait()),
    ("running", True, False, True, Wait()),
    ("running", True, False, False, Wait()),
    ("running", False, True, True, Wait()),
    ("running", False, True, False, Wait()),
    ("running", False, False, True, Follow()),
    ("running", False, False, False, Follow()),
]


def test_the_table_covers_every_combination_once():
    keys = [row[:4] for row in TABLE]
    assert len(keys) == len(set(keys)) == 4 * 2 * 2 * 2


@pytest.mark.parametrize(("state", "same", "present", "alive", "expected"), TABLE)
def test_for_existing(state: str, same: bool, present: bool, alive: bool, expected: Action):
    rel = OWN if same else OTHER
    got = for_existing(job(state), rel, ID, POLICY, T0, alive, present)
    assert got == expected, f"{state}, {'same name' if same else 'another name'}: {got} instead of {expected}"


@pytest.mark.parametrize(
    ("what", "the_job", "rel", "file_id", "now", "policy", "expected"),
    [
        ("done, the archive path lost (a refused move)", job("done", input_moved_to=None), OWN, ID, T0, POLICY,
         Archive(OWN)),
        ("done, delete_inputs", job("done"), OWN, ID, T0, dataclasses.replace(POLICY, delete_inputs=True),
         Archive(None)),
        ("a duplicate of a done job, delete_inputs", job("done"), OTHER, ID, T0,
         dataclasses.replace(POLICY, delete_inputs=True), Archive(None)),
        ("failed longer ago than stale_seconds, owner alive", job("failed"), OWN, ID,
         T0 + dt.timedelta(seconds=31), POLICY, QUARANTINE),
        ("failed exactly stale_seconds ago, owner alive", job("failed"), OWN, ID, T0 + dt.timedelta(seconds=30),
         POLICY, LeaveToOwner()),
        ("failed and already quarantined, dropped in again", job("failed", input_moved_to="/failed/photos/a.png"),
         OWN, ID, T0, POLICY, Requeue()),
        ("pending, rewritten under its own name (another inode)", job("pending"), OWN, FileId(1, 101), T0, POLICY,
         Follow()),
        ("pending, the file's identity unknown", job("pending"), OWN, None, T0, POLICY, Wait()),
    ],
)  # fmt: skip
def test_for_existing_on_what_the_job_records(what, the_job, rel, file_id, now, policy, expected):
    got = for_existing(the_job, rel, file_id, policy, now, True, True)
    assert got == expected, f"{what}: {got} instead of {expected}"


# --- after_run: the outcome of a run --------------------------------------------------------------------------------
PLANNED = PurePosixPath("photos/a.png")


@pytest.mark.parametrize(
    ("what", "error", "source", "attempts", "policy", "expected"),
    [
        ("success", None, "watch", 1, POLICY, Archive(PLANNED, reserved=True)),
        ("success, delete_inputs", None, "watch", 1, dataclasses.replace(POLICY, delete_inputs=True), Archive(None)),
        ("success of a one-off run", None, "cli", 1, POLICY, Keep("the input of a one-off run stays where it is")),
        ("out of memory, attempt 1 of 3", OutOfMemoryError("oom"), "watch", 1, POLICY,
         RetryAt(T0 + dt.timedelta(seconds=30), "out-of-memory", "oom")),
        ("out of memory, attempt 2 of 3", OutOfMemoryError("oom"), "watch", 2, POLICY,
         RetryAt(T0 + dt.timedelta(seconds=60), "out-of-memory", "oom")),
        ("out of memory, attempt 3 of 3", OutOfMemoryError("oom"), "watch", 3, POLICY,
         Quarantine("out-of-memory", "oom")),
        ("disk full, attempt 9: until fixed", DiskFullError("full"), "watch", 9, POLICY,
         RetryAt(T0 + dt.timedelta(seconds=600), "disk-full", "full")),
        ("not an image", DecodeError("bad"), "watch", 1, POLICY, Quarantine("decode", "bad")),
        ("not an image, one-off run", DecodeError("bad"), "bench", 1, POLICY, Keep("decode: bad")),
        ("replaced since it was registered", InputChangedError("new"), "watch", 1, POLICY,
         Keep("the file under this name is not this job's input any more; it is a job of its own")),
    ],
)  # fmt: skip
def test_after_run(what, error, source, attempts, policy, expected):
    got = after_run(job("running", source=source, attempts=attempts), error, policy, T0, PLANNED)
    assert got == expected, f"{what}: {got} instead of {expected}"


# --- carry_out: each action on real files -------------------------------------------------------------------------
class Folders:
    """The four folders, a memory store, and a Mover over them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = MemoryStore(FakeClock())
        self.inbox, self.archive, self.failed = (Root(tmp / n) for n in ("inbox", "archive", "failed"))
        self.mover = Mover(self.store, self.inbox, self.archive, self.failed)

    def drop(self, rel: PurePosixPath, data: bytes = b"pixels") -> FileId:
        path = self.tmp / "inbox" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return FileId.of(os.stat(path))

    def job(self, rel: PurePosixPath, file_id: FileId, state: str) -> Job:
        """A job for ``rel`` brought to ``state`` through the store's transitions (done without an archive path)."""
        spec = JobSpec(sha="1" * 64, rule=RULE, rel=rel, input_path=str(self.inbox.abs(rel)), input_id=file_id)
        (reg,) = self.store.register([spec])
        if state == "pending":
            return reg.job
        (claimed,) = self.store.claim("host:1/w")
        if state == "done":
            from daemon.jobs import Finished

            self.store.finish([Finished(claimed.id, "host:1/w", {})])
        elif state == "failed":
            self.store.fail(claimed.id, "decode", "not an image", owner="host:1/w")
        got = self.store.get(claimed.id)
        assert got is not None
        return got

    def names(self, folder: str) -> list[str]:
        root = self.tmp / folder
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def f(tmp_path: Path) -> Folders:
    return Folders(tmp_path)


def test_archive_to_the_committed_name_records_nothing_more(f: Folders):
    fid = f.drop(OWN)
    committed = str(f.archive.abs(OWN))
    j = dataclasses.replace(f.job(OWN, fid, "done"), input_moved_to=committed)
    commits = f.store.commits
    assert f.mover.carry_out(Archive(None, reserved=True), j, OWN, fid) == committed
    assert f.names("archive") == ["photos/a.png"] and f.names("inbox") == []
    assert f.store.commits == commits, "a move to the name the job records needs no second commit"


def test_archive_to_a_planned_name_taken_meanwhile_records_where_it_went(f: Folders):
    fid = f.drop(OWN)
    j = dataclasses.replace(f.job(OWN, fid, "done"), input_moved_to=str(f.archive.abs(OWN)))
    (f.tmp / "archive" / "photos").mkdir(parents=True)
    (f.tmp / "archive" / "photos" / "a.png").write_bytes(b"someone else's file")
    moved = f.mover.carry_out(Archive(OWN, reserved=True), j, OWN, fid)
    assert moved == str(f.archive.abs("photos/a-1.png"))
    assert f.store.get(j.id).input_moved_to == moved
    assert (f.tmp / "archive" / "photos" / "a.png").read_bytes() == b"someone else's file"


def test_archive_to_a_committed_name_in_a_former_archive_folder_keeps_the_input(f: Folders):
    """The archive folder moved since the job was done: the input goes to the archive there is, never deleted."""
    fid = f.drop(OWN)
    j = dataclasses.replace(f.job(OWN, fid, "done"), input_moved_to="/old-archive/photos/a.png")
    moved = f.mover.carry_out(Archive(None, reserved=True), j, OWN, fid)
    assert moved == str(f.archive.abs(OWN)) and f.names("archive") == ["photos/a.png"]
    assert f.store.get(j.id).input_moved_to == moved


def test_a_duplicate_is_archived_under_a_free_name_and_never_recorded_on_the_job(f: Folders):
    fid = f.drop(OWN)
    j = f.job(OWN, fid, "done")
    (f.tmp / "archive" / "photos").mkdir(parents=True)
    (f.tmp / "archive" / "photos" / "b.png").write_bytes(b"an earlier b.png")
    dup = f.drop(OTHER)
    moved = f.mover.carry_out(Archive(OTHER), j, OTHER, dup)
    assert moved == str(f.archive.abs("photos/b-1.png"))
    assert f.store.get(j.id).input_moved_to is None, "the duplicate is not the job's input"
    assert f.names("inbox") == ["photos/a.png"]


def test_archive_none_deletes_the_input_and_its_prompt(f: Folders):
    fid = f.drop(OWN)
    f.drop(PurePosixPath("photos/a.png.prompt.txt"), b"a barn")
    j = f.job(OWN, fid, "done")
    assert f.mover.carry_out(Archive(None), j, OWN, fid) is None
    assert f.names("inbox") == [] and f.names("archive") == []


def test_a_file_replaced_since_it_was_looked_at_is_never_moved(f: Folders):
    fid = f.drop(OWN)
    j = f.job(OWN, fid, "done")
    f.drop(OTHER, b"new content")
    os.replace(f.tmp / "inbox" / OTHER, f.tmp / "inbox" / OWN)  # another inode under the name
    assert f.mover.carry_out(Archive(OWN, reserved=True), j, OWN, fid) is None
    assert f.mover.carry_out(Quarantine("decode", "bad"), j, OWN, fid) is None
    assert f.names("inbox") == ["photos/a.png"] and f.names("archive") == [] and f.names("failed") == []


def test_quarantine_moves_the_input_beside_its_reason_and_records_it(f: Folders):
    fid = f.drop(OWN)
    j = f.job(OWN, fid, "failed")
    moved = f.mover.carry_out(Quarantine("decode", "not an image"), j, OWN, fid)
    assert moved == str(f.failed.abs(OWN))
    assert f.names("failed") == ["photos/a.png", "photos/a.png.error.json"]
    reason = json.loads((f.tmp / "failed" / "photos" / "a.png.error.json").read_text())
    assert reason["kind"] == "decode" and reason["error"] == "not an image" and reason["job"] == j.id
    assert f.store.get(j.id).input_moved_to == moved


def test_requeue_makes_the_failed_job_pending_again_for_the_new_file(f: Folders):
    fid = f.drop(OWN)
    j = dataclasses.replace(f.job(OWN, fid, "failed"), input_moved_to=str(f.failed.abs(OWN)))
    new = f.drop(OTHER)
    assert f.mover.carry_out(Requeue(), j, OTHER, new) is None
    row = f.store.get(j.id)
    assert (row.state, row.rel, row.input_id, row.attempts) == ("pending", OTHER, new, 0)
    assert row.input_path == str(f.inbox.abs(OTHER)) and row.input_moved_to is None
    assert f.names("inbox") == ["photos/a.png", "photos/b.png"]


def test_follow_points_the_waiting_job_at_its_renamed_input(f: Folders):
    fid = f.drop(OWN)
    j = f.job(OWN, fid, "pending")
    os.rename(f.tmp / "inbox" / OWN, f.tmp / "inbox" / OTHER)
    assert f.mover.carry_out(Follow(), j, OTHER, fid) is None
    row = f.store.get(j.id)
    assert (row.state, row.rel, row.input_id, row.input_path) == ("pending", OTHER, fid, str(f.inbox.abs(OTHER)))


@pytest.mark.parametrize(
    "action",
    [Keep("a one-off run"), RetryAt(T0, "out-of-memory", "oom"), Wait(), LeaveToOwner()],
    ids=["Keep", "RetryAt", "Wait", "LeaveToOwner"],
)
def test_the_actions_that_leave_the_input_where_it_is(f: Folders, action: Action):
    """RetryAt was committed by the job's owner (retry_later) before; the others wait for someone else."""
    fid = f.drop(OWN)
    j = f.job(OWN, fid, "running")
    before, commits = f.store.get(j.id), f.store.commits
    assert f.mover.carry_out(action, j, OWN, fid) is None
    assert f.names("inbox") == ["photos/a.png"] and f.names("archive") == [] and f.names("failed") == []
    assert f.store.get(j.id) == before and f.store.commits == commits
