"""The watcher on real inotify (and the polling observer): completeness, settling, ignores, rescans.

No test here decides anything by how much happens within a fixed window of wall-clock time: a positive check waits
for its condition (with a timeout far above what a loaded 2-core machine needs), and a negative one ("never
taken") is either bounded by a sentinel that arrives after it, or runs on a virtual clock passed to
:meth:`Watcher.ready`.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from daemon.config import DEFAULT_IGNORE
from daemon.watcher import Watcher, scan

SETTLE = 0.3
TIMEOUT = 20.0  # seconds for a file to be reported; only a broken watcher waits this long


def _pump(w: Watcher, seconds: float) -> set[Path]:
    """Drain events and collect ready paths for ``seconds`` (real time)."""
    ready: set[Path] = set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        w.drain(timeout=0.05)
        ready |= set(w.ready(time.monotonic()))
    return ready


def _until(w: Watcher, expected: set[Path], timeout: float = TIMEOUT) -> set[Path]:
    """Drain and collect ready paths until ``expected`` are all among them; fail after ``timeout`` seconds.
    Returns everything that was reported (so a caller can check nothing else was)."""
    got: set[Path] = set()
    deadline = time.monotonic() + timeout
    while not expected <= got:
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout}s still missing {sorted(map(str, expected - got))}; got {sorted(got)}")
        w.drain(timeout=0.05)
        got |= set(w.ready(time.monotonic()))
    return got


def _flush(w: Watcher, tag: str, timeout: float = TIMEOUT) -> None:
    """Apply every event that happened in the inbox so far: make a marker file and drain until it is a candidate.
    inotify keeps the order of events within a folder, so everything before the marker has been applied by then.
    (Markers stay candidates; callers look at their own file only.)"""
    mark = w.root / f"mark-{tag}"
    mark.write_bytes(b"")
    deadline = time.monotonic() + timeout
    while mark not in w.candidates:
        if time.monotonic() > deadline:
            pytest.fail(f"no event for {mark.name} in {timeout}s")
        w.drain(timeout=0.05)


@pytest.fixture
def watcher(tmp_path):
    inbox = tmp_path / "inbox"
    w = Watcher(inbox, DEFAULT_IGNORE, settle_seconds=SETTLE)
    w.start()
    yield w
    w.stop()


def test_close_write_and_move_in_are_taken_after_settling(watcher, tmp_path):
    inbox = watcher.root
    (inbox / "sub" / "deep").mkdir(parents=True)
    (inbox / "a.png").write_bytes(b"a")
    (inbox / "sub" / "deep" / "b.png").write_bytes(b"b")
    outside = tmp_path / "c.png"
    outside.write_bytes(b"c")
    shutil.move(outside, inbox / "sub" / "c.png")
    (inbox / "x.part").write_bytes(b"partial")
    os.rename(inbox / "x.part", inbox / "x.png")  # a download finishing with a rename
    expected = {inbox / "a.png", inbox / "sub" / "deep" / "b.png", inbox / "sub" / "c.png", inbox / "x.png"}
    got = _until(watcher, expected)
    got |= _pump(watcher, 2 * SETTLE)  # anything else (x.part) would have settled by now too
    assert got == expected


def test_ignored_and_hidden_names_never_become_candidates(watcher):
    inbox = watcher.root
    names = [".hidden.png", "a.part", "b.tmp", "c.crdownload", "Thumbs.db", "desktop.ini", "d.png.error.json"]
    for n in names:
        (inbox / n).write_bytes(b"x")
    (inbox / ".cache").mkdir()
    (inbox / ".cache" / "e.png").write_bytes(b"x")
    # A sentinel written after them: its events come after theirs and it settles no sooner, so once it is reported
    # every ignored name has had its chance to be reported too.
    (inbox / "zz-sentinel.png").write_bytes(b"s")
    got = _until(watcher, {inbox / "zz-sentinel.png"})
    got |= _pump(watcher, 2 * SETTLE)
    assert got == {inbox / "zz-sentinel.png"}
    assert not watcher.candidates
    assert [p.name for p in scan(inbox, DEFAULT_IGNORE)] == ["zz-sentinel.png"]


def test_a_custom_ignore_list_replaces_the_default_one(tmp_path):
    inbox = tmp_path / "inbox"
    w = Watcher(inbox, ["*.raw", "draft-*"], settle_seconds=0.1)
    w.start()
    try:
        for n in ("a.raw", "draft-1.png", "b.part", "c.png"):  # b.part: only the default list ignores it
            (inbox / n).write_bytes(b"x")
        (inbox / "zz-sentinel.png").write_bytes(b"s")
        expected = {inbox / "b.part", inbox / "c.png", inbox / "zz-sentinel.png"}
        got = _until(w, expected) | _pump(w, 0.3)
        assert got == expected
        # The scans (at start and every rescan_seconds) use the same list.
        assert sorted(p.name for p in scan(inbox, ["*.raw", "draft-*"])) == ["b.part", "c.png", "zz-sentinel.png"]
    finally:
        w.stop()


def test_a_slow_writer_pausing_longer_than_settle_is_taken_once_after_its_close(watcher):
    """The close-write gate, not the settle timer, holds a file that is still open: each pause here is over twice
    ``settle_seconds``, so a watcher that went by size and mtime alone would take the file mid-write."""
    path = watcher.root / "slow.png"
    with open(path, "wb") as fh:
        for _ in range(4):
            fh.write(b"x" * 1000)
            fh.flush()
            seen = _pump(watcher, 2.5 * SETTLE)  # size and mtime hold for longer than settle_seconds
            assert not seen, "a file still open for writing must not be taken"
    closed = time.monotonic()
    got = _until(watcher, {path})
    assert got == {path} and time.monotonic() >= closed
    assert _pump(watcher, 2 * SETTLE) == set()  # exactly once


def test_rewritten_file_waits_for_its_size_to_settle(tmp_path):
    """Each close restarts the settle clock. Real inotify events, and a virtual clock handed to ``ready(now)``, so a
    busy machine that stalls between two writes cannot change the outcome."""
    inbox = tmp_path / "inbox"
    settle = 0.5
    w = Watcher(inbox, DEFAULT_IGNORE, settle_seconds=settle)
    w.start()
    try:
        p = inbox / "grow.png"

        def ready(at: float) -> list[Path]:
            return [x for x in w.ready(at) if x == p]

        now = 1000.0
        for i in range(4):  # separate open/close cycles, 0.4 virtual seconds apart
            with open(p, "ab") as fh:
                fh.write(b"y" * 100)
            _flush(w, str(i))  # its modify and close events are applied
            assert ready(now) == []  # a new size: the clock starts again here
            assert ready(now + 0.4) == []  # 0.4 < settle since the last change
            now += 0.4
        assert ready(now + settle - 0.4 - 0.01) == []
        assert ready(now + settle - 0.4) == [p]  # settle_seconds after the last change, and only then
        assert ready(now + 10) == []  # handed on once
    finally:
        w.stop()


def test_rescan_finds_files_that_made_no_events(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    w = Watcher(inbox, DEFAULT_IGNORE, settle_seconds=0.1)  # never started: no events at all
    (inbox / "q").mkdir()
    (inbox / "q" / "found.png").write_bytes(b"z")
    (inbox / "link.png").symlink_to(inbox / "q" / "found.png")
    os.symlink(tmp_path, inbox / "escape")  # a linked folder is not entered
    (tmp_path / "outside.png").write_bytes(b"o")
    assert w.rescan() == 2
    expected = {inbox / "q" / "found.png", inbox / "link.png"}
    assert _until(w, expected) == expected
    assert w.rescan() == 0  # handed on and unchanged: a rescan does not hash a queued file again
    (inbox / "q" / "found.png").write_bytes(b"changed")
    assert w.rescan() == 1  # changed behind our back: looked at again
    w.finished(inbox / "link.png")
    w.drain()
    assert w.rescan() == 1  # its job ended and it is still here (say the archive move failed): looked at again


def test_polling_observer_sees_new_files(tmp_path):
    inbox = tmp_path / "inbox"
    w = Watcher(inbox, DEFAULT_IGNORE, settle_seconds=0.2, polling=True, poll_seconds=0.2)
    w.start()
    try:
        (inbox / "n.png").write_bytes(b"n")
        assert _until(w, {inbox / "n.png"}) == {inbox / "n.png"}
    finally:
        w.stop()


def test_a_folder_moved_in_is_scanned(watcher, tmp_path):
    staging = tmp_path / "batch"
    staging.mkdir()
    for i in range(3):
        (staging / f"{i}.png").write_bytes(b"m")
    os.rename(staging, watcher.root / "batch")
    expected = {watcher.root / "batch" / f"{i}.png" for i in range(3)}
    got = _until(watcher, expected) | _pump(watcher, 2 * SETTLE)
    assert got == expected


def test_a_folder_swapped_for_a_file_or_a_link_loop_drops_only_the_files_under_it(watcher, tmp_path):
    """Issue 20, finding 2: ``inbox/a/x.png`` waits to settle, and ``inbox/a`` is moved away and a plain file named
    ``a`` put in its place. ``lstat`` of the candidate then fails with ENOTDIR (ELOOP under a link loop), which
    :meth:`Watcher.ready` did not catch: it raised on every call, and intake stopped for good. Now each path stands
    alone: those two candidates are dropped, and the file beside them is taken."""
    root = watcher.root
    for folder in ("a", "c"):
        (root / folder).mkdir()
    (root / "a" / "x.png").write_bytes(b"x")
    (root / "c" / "y.png").write_bytes(b"y")
    _flush(watcher, "1")
    assert {root / "a" / "x.png", root / "c" / "y.png"} <= set(watcher.candidates)
    os.rename(root / "a", tmp_path / "a-away")
    (root / "a").write_bytes(b"not a folder any more")
    os.rename(root / "c", tmp_path / "c-away")
    os.symlink("c", root / "c")  # c -> c: a loop
    (root / "b.png").write_bytes(b"b")
    got = _until(watcher, {root / "b.png"})
    assert not {root / "a" / "x.png", root / "c" / "y.png"} & got
    assert not {root / "a" / "x.png", root / "c" / "y.png"} & set(watcher.candidates)
