"""Every crash window of the job path, reached deterministically: the real daemon runs to a failpoint and dies there
(``os._exit``, as a SIGKILL would leave it), a second daemon starts, and the crash table's row must hold: one output,
one archive copy, one ``done`` row with its metrics, nothing lost, no temp file.

The rows of the crash table in docs/reliability.md name these tests.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from daemon.failpoints import EXIT_CODE, POINTS
from tests.conftest import Daemon, image, ready_rows, rows, wait_for, write_config

RULE = [{"folder": "", "model": "fsrcnn", "scale": 2, "metrics": ["lr_psnr_y", "lr_ssim_y"]}]


def crash_at(cfg: Path, point: str, drop) -> None:  # noqa: ANN001 - a callable that drops the files
    """Start the daemon armed to die at ``point``, drop the files, and wait for it to die there."""
    env = {"UPSCALED_FAILPOINTS_TEST": "1", "UPSCALED_FAILPOINTS": f"{point}=exit"}
    d = Daemon(cfg, env)
    try:
        d.wait_started()
        drop()
        wait_for(lambda: d.proc.poll() is not None, 60, what=f"the daemon to die at {point}")
        assert d.proc.returncode == EXIT_CODE, d.log_path.read_text()[-2000:]
        assert f"failpoint {point}: exit" in d.log_path.read_text()
    finally:
        d.kill()


def check_row(tmp_path: Path, name: str, state: str = "done") -> dict:
    """The crash table's promise for one input: one job row, one output, one archive (or failed/) copy, its
    metrics, nothing in the inbox, no temp file anywhere."""
    db = tmp_path / "var" / "upscaled.db"
    (job,) = rows(db, "SELECT * FROM jobs")
    assert job["state"] == state, job
    assert not (tmp_path / "inbox" / name).exists()
    leftovers = [p for p in tmp_path.rglob("*.upscaled-tmp")]
    assert not leftovers, leftovers
    if state == "done":
        outputs = list((tmp_path / "outbox").iterdir())
        assert [p.name for p in outputs] == [Path(name).stem + ".fsrcnn.x2.png"] == [Path(job["output_path"]).name]
        assert [p.name for p in (tmp_path / "archive").iterdir()] == [name]
        assert job["input_moved_to"] == str(tmp_path / "archive" / name) and job["attempts"] >= 1
        metrics = {r["name"] for r in rows(db, "SELECT name FROM metrics WHERE job_id = ?", job["id"])}
        assert metrics == {"lr_psnr_y", "lr_ssim_y"} and job["metrics_state"] == "done"
    else:
        assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == [name, name + ".error.json"]
        assert not list((tmp_path / "outbox").iterdir())
    return job


def finish(cfg: Path, daemon, tmp_path: Path, state: str = "done") -> None:  # noqa: ANN001 - the fixture
    d = daemon(cfg)
    db = tmp_path / "var" / "upscaled.db"
    wait_for(
        lambda: [
            r
            for r in ready_rows(db, "SELECT state, metrics_state, input_moved_to FROM jobs")
            if r["state"] == state and r["input_moved_to"] and r["metrics_state"] in ("done", None)
        ],
        60,
        what=f"the job {state} and its input moved",
    )
    assert d.stop() == 0


@pytest.mark.parametrize(
    "point", ["after-register", "after-claim", "in-infer", "mid-write", "after-write", "after-commit", "after-archive"]
)
def test_a_crash_in_each_window_of_a_good_file_loses_and_repeats_nothing(tmp_path, weights_dir, daemon, point):
    cfg = write_config(tmp_path, weights=weights_dir, rules=RULE, settle_seconds=0.1)
    crash_at(cfg, point, lambda: image(tmp_path / "inbox" / "p.png", (48, 40)))
    db = tmp_path / "var" / "upscaled.db"
    (left,) = rows(db, "SELECT state, output_path, metrics_state FROM jobs")
    expected = {
        "after-register": "pending",
        "after-claim": "running",
        "in-infer": "running",
        "mid-write": "running",
        "after-write": "running",
        "after-commit": "done",
        "after-archive": "done",
    }[point]
    assert left["state"] == expected, left
    if point == "mid-write":
        assert list((tmp_path / "outbox").glob(".*.upscaled-tmp")), "the temp file the crash left"
    if point in ("after-write", "after-commit", "after-archive"):
        assert Path(left["output_path"]).is_file()
    if point == "after-commit":
        assert (tmp_path / "inbox" / "p.png").exists()  # committed, not yet moved
    if point == "after-archive":
        assert left["metrics_state"] == "pending" and not (tmp_path / "inbox" / "p.png").exists()
    finish(cfg, daemon, tmp_path)
    job = check_row(tmp_path, "p.png")
    # A job that was claimed runs again into the same reserved output (never a -1 copy); one that was committed
    # is not redone at all.
    assert job["attempts"] == {"after-register": 1, "after-commit": 1, "after-archive": 1}.get(point, 2)


def test_a_crash_between_the_failed_commit_and_the_quarantine_move(tmp_path, weights_dir, daemon):
    cfg = write_config(
        tmp_path, weights=weights_dir, rules=RULE, settle_seconds=0.1, stale_seconds=2, heartbeat_seconds=0.5
    )
    bad = tmp_path / "staging" / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)

    def drop() -> None:
        os.rename(bad, tmp_path / "inbox" / "bad.png")

    crash_at(cfg, "on-fail", drop)
    (left,) = rows(tmp_path / "var" / "upscaled.db", "SELECT state, input_moved_to FROM jobs")
    assert left == {"state": "failed", "input_moved_to": None} and (tmp_path / "inbox" / "bad.png").exists()
    time.sleep(2.1)  # the dead owner's grace (stale_seconds): past it, any node finishes the move
    finish(cfg, daemon, tmp_path, state="failed")
    check_row(tmp_path, "bad.png", state="failed")


def test_failpoints_need_the_test_switch_and_refuse_typos(tmp_path):
    import subprocess

    cfg = write_config(tmp_path)
    base = dict(os.environ, UPSCALED_CONFIG=str(cfg))
    stray = subprocess.run(
        [sys.executable, "-m", "daemon", "check-config"],
        capture_output=True,
        text=True,
        env=dict(base, UPSCALED_FAILPOINTS="after-commit=exit"),
        timeout=60,
    )
    assert stray.returncode == 0  # without the switch, a stray variable arms nothing
    typo = subprocess.run(
        [sys.executable, "-m", "daemon", "check-config"],
        capture_output=True,
        text=True,
        env=dict(base, UPSCALED_FAILPOINTS_TEST="1", UPSCALED_FAILPOINTS="after-comit=exit"),
        timeout=60,
    )
    assert typo.returncode != 0 and "after-comit" in typo.stderr
    assert set(POINTS) >= {"after-claim", "after-write", "after-commit", "after-archive", "on-fail"}
