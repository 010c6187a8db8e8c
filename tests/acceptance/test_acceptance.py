"""Acceptance: the real `upscaled run` subprocess on temp folders, signalled and killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import image, ready_rows, rows, wait_for, write_config

RULES = [
    {"folder": "photos", "model": "fsrcnn", "scale": 2},
    {"folder": "fast", "model": "bicubic", "scale": 3, "format": "jpg", "quality": 90, "metrics": []},
]


def _done(db, n: int):
    return lambda: len(ready_rows(db, "SELECT id FROM jobs WHERE state IN ('done', 'failed')")) >= n


def test_service_end_to_end_with_two_rule_folders(tmp_path, weights_dir, daemon):
    cfg = write_config(tmp_path, weights=weights_dir, rules=RULES)
    d = daemon(cfg)
    inbox = tmp_path / "inbox"
    for sub in ("photos", "fast"):
        (inbox / sub).mkdir(parents=True, exist_ok=True)
    for i in range(3):
        image(tmp_path / "drop" / f"p{i}.png", (48, 40), seed=i)
        os.rename(tmp_path / "drop" / f"p{i}.png", inbox / "photos" / f"p{i}.png")
        image(inbox / "fast" / f"f{i}.png", (30, 20), seed=10 + i)
    db = tmp_path / "var" / "upscaled.db"
    wait_for(_done(db, 6), 120, what="6 jobs")
    assert d.stop() == 0
    jobs = rows(db, "SELECT * FROM jobs ORDER BY rel_path")
    assert [j["state"] for j in jobs] == ["done"] * 6
    for j in jobs:
        assert os.path.isfile(j["output_path"]) and os.path.isfile(j["input_moved_to"])
        assert j["t_total"] > 0 and j["t_infer"] is not None and j["device"] == "cpu"
    for i in range(3):
        assert Image.open(tmp_path / "outbox" / "photos" / f"p{i}.fsrcnn.x2.png").size == (96, 80)
        assert Image.open(tmp_path / "outbox" / "fast" / f"f{i}.bicubic.x3.jpg").size == (90, 60)
    assert not list(inbox.rglob("*.png"))
    metrics = rows(db, "SELECT j.folder, m.name FROM metrics m JOIN jobs j ON j.id = m.job_id")
    assert {m["folder"] for m in metrics} == {"photos"}  # metrics = [] turns them off for "fast"
    events = d.events()
    assert sum(e.get("event") == "job.done" for e in events) == 6  # one summary line per job, as JSON
    assert events[-1]["event"] == "service.stopped"


def test_sigterm_lets_the_current_job_finish(tmp_path, weights_dir, daemon):
    cfg = write_config(
        tmp_path, weights=weights_dir, rules=[{"folder": "", "model": "lapsrn", "scale": 8, "metrics": []}]
    )
    d = daemon(cfg)
    image(tmp_path / "inbox" / "big.png", (128, 128))
    db = tmp_path / "var" / "upscaled.db"
    wait_for(lambda: ready_rows(db, "SELECT id FROM jobs WHERE state = 'running'"), 60, interval=0.01)
    assert d.stop(signal.SIGTERM, timeout=150) == 0
    (job,) = rows(db, "SELECT * FROM jobs")
    assert job["state"] == "done" and Image.open(job["output_path"]).size == (1024, 1024)


def test_restart_after_sigkill_loses_nothing_and_repeats_nothing(tmp_path, weights_dir, daemon):
    # Killed whenever a job runs, again and again: after the first kill the jobs taken back run alone, and so take
    # the next kills alone. No file is at fault here, so the poison cap (tests/acceptance/test_sandbox_daemon.py)
    # is set out of reach: this test is about nothing lost and nothing repeated.
    cfg = write_config(
        tmp_path,
        weights=weights_dir,
        rules=[{"folder": "", "model": "fsrcnn", "scale": 4, "metrics": []}],
        max_recoveries=100,
    )
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(12):
        image(inbox / f"k{i}.png", (120, 100), seed=i)
    db = tmp_path / "var" / "upscaled.db"
    for _ in range(3):  # kill it mid-work, three times
        d = daemon(cfg)
        # Killed once *this* process holds a job (its pid is in jobs.worker): a condition, not a moment, so a slow
        # start on a loaded machine only makes the wait longer.
        mine = f"%:{d.proc.pid}"
        wait_for(
            lambda m=mine: ready_rows(db, "SELECT id FROM jobs WHERE state = 'running' AND worker LIKE ?", m),
            60,
            interval=0.005,
            what="a job claimed by this daemon",
        )
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
    d = daemon(cfg)
    wait_for(
        lambda: len(rows(db, "SELECT id FROM jobs WHERE state = 'done'")) == 12 and not list(inbox.iterdir()),
        240,
        what="all 12 done",
    )
    assert d.stop() == 0
    outputs = sorted(p.name for p in (tmp_path / "outbox").iterdir())
    assert outputs == sorted(f"k{i}.fsrcnn.x4.png" for i in range(12))  # no duplicates, no temp files
    assert len(list((tmp_path / "archive").iterdir())) == 12
    for p in (tmp_path / "outbox").iterdir():
        assert Image.open(p).size == (480, 400)


def test_a_file_dropped_while_the_service_is_down_is_processed_at_start(tmp_path, daemon, weights_dir):
    cfg = write_config(tmp_path, weights=weights_dir)
    image(tmp_path / "inbox" / "sub" / "waiting.png", (30, 20))
    d = daemon(cfg)
    wait_for(lambda: (tmp_path / "outbox" / "sub" / "waiting.bicubic.x2.png").exists(), 60)
    assert d.stop() == 0


def _without_read_override() -> list[str]:
    """A command prefix under which file permissions bind even for root (root reads everything otherwise)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot make a file unreadable")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_unreadable_file_fails_its_job_and_stays(tmp_path, weights_dir):
    cfg = write_config(tmp_path, weights=weights_dir)
    image(tmp_path / "inbox" / "locked.png", (30, 20))
    image(tmp_path / "inbox" / "open.png", (30, 20), seed=2)
    os.chmod(tmp_path / "inbox" / "locked.png", 0o000)
    env = dict(os.environ, UPSCALED_CONFIG=str(cfg))
    proc = subprocess.Popen(
        [*_without_read_override(), sys.executable, "-m", "daemon", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        db = tmp_path / "var" / "upscaled.db"
        wait_for(lambda: (tmp_path / "failed" / "locked.png.error.json").exists() or proc.poll() is not None, 60)
        wait_for(_done(db, 2), 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    info = json.loads((tmp_path / "failed" / "locked.png.error.json").read_text())
    assert info["kind"] == "unreadable" and "ermission" in info["error"]
    assert (tmp_path / "failed" / "locked.png").exists()
    assert (tmp_path / "outbox" / "open.bicubic.x2.png").exists()
