"""The service's watch side stepped in one thread over the in-memory store, with a fake clock: admitting files,
and reconciling a file whose content already has a job (every action of ``for_existing``), then reload.

Real folders and a real model (nearest-neighbour: exact and instant); the watcher is never started (no inotify):
its rescan finds the files, and the fake clock lets them settle. No threads of ours, no subprocess, no sleeps.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import structlog
from PIL import Image

from daemon.config import load_settings
from daemon.jobs import Job, JobSpec, MemoryStore
from daemon.logs import configure
from daemon.service import Service
from tests.conftest import FakeClock, shared_sandbox, write_config

NEAREST = [{"folder": "", "model": "nearest", "scale": 2, "format": "png"}]
DEAD = f"{socket.gethostname()}:{2**22 + 17}/infer"  # a worker on this host whose process is gone


class Rig:
    """A service over a memory store, joined as its node, never started (the watcher's rescan stands in)."""

    def __init__(self, tmp: Path, **keys) -> None:
        self.tmp = tmp
        self.config = write_config(tmp, rules=keys.pop("rules", NEAREST), **keys)
        self.clock = FakeClock()
        self.store = MemoryStore(self.clock)
        self.svc = Service(
            load_settings(self.config), store=self.store, clock=self.clock.monotonic, sandbox=shared_sandbox()
        )
        self.svc.cluster.join()

    def drop(self, name: str, seed: int = 0, data: bytes | None = None) -> PurePosixPath:
        path = self.tmp / "inbox" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        else:
            rng = np.random.default_rng(seed)
            Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(path)
        return PurePosixPath(name)

    def settle(self) -> None:
        """Let the files dropped so far settle, and admit them (no job is run)."""
        self.svc.watch_step()
        self.clock.advance(1.0)
        self.svc.watch_step()

    def names(self, folder: str) -> list[str]:
        root = self.tmp / folder
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.svc.shutdown()


# --- admitting ----------------------------------------------------------------------------------------------------
def test_a_file_is_admitted_once_it_has_settled_then_run_and_archived(rig: Rig):
    rel = rig.drop("photos/a.png")
    rig.svc.watch_step()  # the first look: a candidate, not settled yet
    assert rig.store.counts()["pending"] == 0
    rig.clock.advance(1.0)
    assert rig.svc.step() is True  # admitted, then run through every stage in this thread
    job = rig.store.get(1)
    assert job is not None and job.state == "done" and job.rel == rel
    assert rig.names("outbox") == ["photos/a.nearest.x2.png"] and rig.names("archive") == ["photos/a.png"]
    assert job.input_moved_to == str(rig.tmp / "archive" / "photos" / "a.png") and rig.names("inbox") == []


def test_a_burst_is_registered_in_commits_of_4_then_8(rig: Rig):
    rels = [rig.drop(f"b{i:02}.png", seed=i) for i in range(13)]
    commits = rig.store.commits
    rig.svc.admit(rels)
    assert rig.store.counts()["pending"] == 13
    assert rig.store.commits - commits == 3, "13 files: commits of 4, 8 and the last 1"


def test_a_file_that_fails_at_intake_is_failed_and_quarantined_at_once(rig: Rig):
    rig.drop("junk.png", data=b"not an image at all")
    rig.settle()
    job = rig.store.get(1)
    assert job is not None and job.state == "failed" and job.error_kind == "decode"
    assert rig.names("failed") == ["junk.png", "junk.png.error.json"] and rig.names("inbox") == []
    assert json.loads((rig.tmp / "failed" / "junk.png.error.json").read_text())["kind"] == "decode"


# --- reconciling a file whose content has a job --------------------------------------------------------------------
def _done(rig: Rig, rel: PurePosixPath) -> Job:
    """Run ``rel``'s job to done, then put its input back where it was (the crash came before the move)."""
    rig.settle()
    data = (rig.tmp / "inbox" / rel).read_bytes()
    assert rig.svc.step() is True
    job = rig.store.get(1)
    assert job is not None and job.state == "done"
    (rig.tmp / "archive" / rel).unlink()
    (rig.tmp / "inbox" / rel).write_bytes(data)
    return job


def test_a_done_jobs_input_left_in_the_inbox_goes_to_its_committed_archive_name(rig: Rig):
    rel = rig.drop("a.png")
    job = _done(rig, rel)
    rig.svc.admit([rel])
    assert rig.names("inbox") == [] and rig.names("archive") == ["a.png"]
    assert rig.store.get(job.id).input_moved_to == job.input_moved_to


def test_a_duplicate_of_a_done_job_is_archived_under_its_own_name_and_the_job_is_untouched(rig: Rig):
    rel = rig.drop("a.png")
    job = _done(rig, rel)
    rig.svc.admit([rel])
    copy = rig.drop("copy.png", data=(rig.tmp / "archive" / "a.png").read_bytes())
    rig.svc.admit([copy])
    assert rig.names("archive") == ["a.png", "copy.png"] and rig.names("inbox") == []
    assert rig.store.get(job.id).input_moved_to == job.input_moved_to
    assert rig.store.counts()["done"] == 1, "a duplicate makes no second job"


def _failed_by(rig: Rig, rel: PurePosixPath, worker: str) -> Job:
    """``rel`` registered and failed by ``worker`` just now; the crash (or its worker's move) is still to come."""
    rig.svc.admit([rel])
    (job,) = rig.store.claim(worker, node="other")
    assert rig.store.fail(job.id, "out-of-memory", "oom", owner=worker)
    return rig.store.get(job.id)


def test_a_file_failed_a_moment_ago_by_a_live_worker_is_left_to_it_then_quarantined_once_stale(rig: Rig):
    rel = rig.drop("a.png")
    job = _failed_by(rig, rel, f"{socket.gethostname()}:{os.getpid()}/infer")  # this very process: alive
    rig.svc.admit([rel])
    assert rig.names("inbox") == ["a.png"] and rig.names("failed") == []
    assert rig.tmp / "inbox" / "a.png" not in rig.svc.watcher.candidates, "the watcher forgets it meanwhile"
    rig.clock.advance(rig.svc.settings.stale_seconds + 1)
    rig.svc.admit([rel])
    assert rig.names("failed") == ["a.png", "a.png.error.json"]
    assert rig.store.get(job.id).input_moved_to == str(rig.tmp / "failed" / "a.png")


def test_a_file_whose_worker_died_after_failing_it_is_quarantined_at_once(rig: Rig):
    rel = rig.drop("a.png")
    _failed_by(rig, rel, DEAD)
    rig.svc.admit([rel])
    assert rig.names("failed") == ["a.png", "a.png.error.json"] and rig.names("inbox") == []


def test_a_failed_files_content_dropped_again_is_tried_again(rig: Rig):
    rel = rig.drop("a.png")
    job = _failed_by(rig, rel, DEAD)
    rig.svc.admit([rel])  # quarantined
    again = rig.drop("again.png", data=(rig.tmp / "failed" / "a.png").read_bytes())
    rig.svc.admit([again])
    row = rig.store.get(job.id)
    assert (row.state, row.rel, row.attempts, row.input_moved_to) == ("pending", again, 0, None)
    assert rig.svc.step() is True and rig.store.get(job.id).state == "done"
    assert rig.names("archive") == ["again.png"]


def test_a_waiting_jobs_input_renamed_is_followed(rig: Rig):
    rel = rig.drop("a.png")
    rig.svc.admit([rel])
    os.rename(rig.tmp / "inbox" / "a.png", rig.tmp / "inbox" / "renamed.png")
    rig.svc.admit([PurePosixPath("renamed.png")])
    assert rig.store.get(1).rel == PurePosixPath("renamed.png")
    assert rig.svc.step() is True and rig.names("archive") == ["renamed.png"]


def test_a_duplicate_of_a_waiting_job_waits_for_it_then_is_archived(rig: Rig):
    rel = rig.drop("a.png")
    rig.svc.admit([rel])
    dup = rig.drop("dup.png", data=(rig.tmp / "inbox" / "a.png").read_bytes())
    rig.svc.admit([dup])
    assert rig.names("inbox") == ["a.png", "dup.png"] and rig.svc._waiting == {1: [dup]}
    assert rig.svc.step() is True  # the job runs; its end hands the duplicate back to the main loop
    rig.svc.watch_step()
    assert rig.names("inbox") == [] and rig.names("archive") == ["a.png", "dup.png"]
    assert rig.store.counts()["done"] == 1


# --- reload -------------------------------------------------------------------------------------------------------
def test_reload_swaps_the_settings_every_part_reads_and_keeps_the_restart_keys(rig: Rig):
    old = rig.svc.settings
    write_config(
        rig.tmp,
        rules=[{"folder": "", "model": "nearest", "scale": 3, "format": "png"}],
        max_attempts=7,
        inbox="elsewhere",
    )
    rig.svc.reload()
    new = rig.svc.settings
    assert new is not old and new.max_attempts == 7
    for part in (rig.svc.stages, rig.svc.intake, rig.svc.cluster):
        assert part.settings is new, f"{type(part).__name__} still reads the old settings"
    assert new.inbox == old.inbox, "inbox needs a restart: the running one stays"
    assert rig.svc.stages.policy.max_attempts == 7
    spec = rig.svc.intake.spec(rig.drop("a.png"))
    assert isinstance(spec, JobSpec) and spec.rule.scale == 3


class _StuckStream(io.StringIO):
    """A log stream whose writes wait until ``opened``: a log line caught half written, the log's lock held."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = threading.Event()
        self.entered = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.opened.wait(30)
        return super().write(text)


def test_a_stop_signal_during_a_log_line_stops_the_service_instead_of_hanging_it(rig: Rig):
    # A signal handler runs on the main thread between two bytecodes: here, while that thread is inside a log call
    # holding the log's lock. A handler that logs waits for that lock forever (found live: a daemon SIGTERMed
    # while it logged hung, and ignored every later SIGTERM). The writer thread plays the interrupted main thread.
    saved = structlog.get_config()
    stream = _StuckStream()
    configure("info", "json", stream=stream)
    writer = threading.Thread(target=lambda: rig.svc.log.info("a.line.half.written"), daemon=True)
    handler = threading.Thread(target=rig.svc.request_stop, args=(signal.SIGTERM, None), daemon=True)
    try:
        writer.start()
        assert stream.entered.wait(10), "the log line never reached the stream"
        handler.start()
        handler.join(3)
        returned = not handler.is_alive()
    finally:
        stream.opened.set()
        writer.join(10)
        handler.join(10)
        structlog.configure(**saved)
    assert returned, (
        "request_stop (the SIGTERM/SIGINT handler) waited for the log's lock, held by the code it interrupted: "
        "a handler may only set flags, and the main loop logs the stop"
    )
    assert rig.svc.stopping and rig.svc.stop_signal == signal.SIGTERM
