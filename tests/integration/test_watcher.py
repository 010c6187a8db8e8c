"""The watcher on real inotify (and the polling observer): completeness, settling, ignores, rescans."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from daemon.config import DEFAULT_IGNORE
from daemon.watcher import Watcher, scan
from tests.conftest import wait_for


def _pump(w: Watcher, seconds: float) -> set[Path]:
    """Drain events and collect ready paths for ``seconds``."""
    ready: set[Path] = set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        w.drain(timeout=0.05)
        ready |= set(w.ready(time.monotonic()))
    return ready


@pytest.fixture
def watcher(tmp_path):
    inbox = tmp_path / "inbox"
    w = Watcher(inbox, DEFAULT_IGNORE, settle_seconds=0.3)
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
    got = _pump(watcher, 1.0)
    assert got == {inbox / "a.png", inbox / "sub" / "deep" / "b.png", inbox / "sub" / "c.png", inbox / "x.png"}


def test_ignored_and_hidden_names_never_become_candidates(watcher):
    inbox = watcher.root
    names = [".hidden.png", "a.part", "b.tmp", "c.crdownload", "Thumbs.db", "desktop.ini", "d.png.error.json"]
    for n in names:
        (inbox / n).write_bytes(b"x")
    (inbox / ".cache").mkdir()
    (inbox / ".cache" / "e.png").write_bytes(b"x")
    assert _pump(watcher, 0.8) == set()
    assert list(scan(inbox, DEFAULT_IGNORE)) == []


def test_a_slow_writer_is_taken_once_after_its_last_chunk(watcher):
    path = watcher.root / "slow.png"
    ready_at = []
    start = time.monotonic()
    with open(path, "wb") as fh:  # one open file, written in chunks over ~1.5 s
        for _ in range(6):
            fh.write(b"x" * 1000)
            fh.flush()
            seen = _pump(watcher, 0.25)
            assert not seen, "a file still open for writing must not be taken"
    end_write = time.monotonic()
    got = wait_for(lambda: _pump(watcher, 0.1) or None, 5, what="slow.png ready")
    ready_at.append(time.monotonic())
    assert got == {path} and ready_at[0] > end_write and end_write - start >= 1.4
    assert _pump(watcher, 0.6) == set()  # exactly once


def test_rewritten_file_waits_for_its_size_to_settle(tmp_path):
    inbox = tmp_path / "inbox"
    w = Watcher(inbox, DEFAULT_IGNORE, settle_seconds=0.5)
    w.start()
    try:
        p = inbox / "grow.png"
        for _i in range(4):  # separate open/close cycles, 0.2 s apart: each close restarts the settle clock
            with open(p, "ab") as fh:
                fh.write(b"y" * 100)
            assert not _pump(w, 0.2)
        assert wait_for(lambda: _pump(w, 0.1) or None, 5) == {p}
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
    assert _pump(w, 0.4) == {inbox / "q" / "found.png", inbox / "link.png"}
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
        assert wait_for(lambda: _pump(w, 0.1) or None, 10) == {inbox / "n.png"}
    finally:
        w.stop()


def test_a_folder_moved_in_is_scanned(watcher, tmp_path):
    staging = tmp_path / "batch"
    staging.mkdir()
    for i in range(3):
        (staging / f"{i}.png").write_bytes(b"m")
    os.rename(staging, watcher.root / "batch")
    got = wait_for(lambda: _pump(watcher, 0.2) or None, 5)
    got |= _pump(watcher, 0.5)
    assert got == {watcher.root / "batch" / f"{i}.png" for i in range(3)}
