"""Promises that had no test, each checked where it can break: the real service wiring driven in this process, a
real SQLite file, real files, real models (classical kernels: exact and quick), and a child process for the
out-of-memory path.

The mutation guard (``make test-mutations``, tests/mutations.py) breaks these invariants one line at a time and runs
the tests named beside each break: several of them are here.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity
from sqlalchemy import event

from daemon.config import load_settings
from daemon.dispositions import Mover
from daemon.errors import ConfigError
from daemon.fsops import Root
from daemon.intake import Intake
from daemon.jobs import worker_id
from daemon.metrics import full_reference
from daemon.service import Service
from daemon.store import SqlStore
from daemon.worker import Stages
from models.registry import ModelCache
from models.resize import imresize
from tests.conftest import ROOT, SET5, image, rows, shared_sandbox, started_services, write_config

RULE = {"folder": "", "model": "bicubic", "scale": 2, "format": "png", "metrics": ["lr_psnr_y", "lr_ssim_y"]}
T0 = dt.datetime(2026, 1, 1, 12, 0, 0)


# --- the harness: the real Service, stepped in this thread ---------------------------------------------------------
@pytest.fixture
def make_service(tmp_path) -> Iterator[Callable[..., Service]]:
    """Services over one set of folders and one SQLite file (see :func:`tests.conftest.started_services`)."""
    with started_services(tmp_path, rules=[RULE], settle_seconds=0.05) as make:
        yield make


def run_until(svc: Service, predicate: Callable[[], object], timeout: float = 60.0, what: str = "") -> None:
    """Step the service (watch, admit, one job) until ``predicate()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or predicate}; jobs: {svc.store.counts()}")
        svc.step(wait=0.05)


def db_rows(svc: Service, sql: str, *params) -> list[dict]:
    """Rows read through a connection of our own: what is committed, as another process would see it."""
    path = svc.settings.sqlite_path()
    assert path is not None
    return rows(path, sql, *params)


def drop(svc: Service, name: str, seed: int = 0, size: tuple[int, int] = (48, 40)) -> PurePosixPath:
    image(svc.settings.inbox / name, size, seed=seed)
    return PurePosixPath(name)


def claimed(svc: Service, rel: PurePosixPath):  # noqa: ANN201 - a worker Task
    """Register ``rel`` and claim its job (the output path is reserved in the claim); returns the task."""
    svc.admit([rel])
    (task,) = svc.stages.claim(worker_id("test"))
    return task


# --- the output path: recorded with the claim, reused by the retry ----------------------------------------------------
def test_the_output_path_is_committed_with_the_claim_and_a_retry_writes_there_again(make_service):
    svc = make_service()
    task = claimed(svc, drop(svc, "a.png"))
    reserved = svc.settings.outbox / "a.bicubic.x2.png"
    # Another connection sees the reservation: it is committed before a byte of the output is written.
    assert db_rows(svc, "SELECT state, output_path FROM jobs") == [{"state": "running", "output_path": str(reserved)}]
    assert not any(svc.settings.outbox.iterdir())
    svc.stages.run_task(task, "cpu")  # read, infer, write: the output is in place, the job still running
    assert task.error is None and reserved.is_file()
    svc.shutdown()  # the process ends here, nothing settled (a crash after writing the output)

    nxt = make_service()  # the next start takes its own node's running job back and runs it again
    run_until(nxt, lambda: db_rows(nxt, "SELECT id FROM jobs WHERE state = 'done' AND metrics_state = 'done'"))
    (job,) = db_rows(nxt, "SELECT * FROM jobs")
    assert job["output_path"] == str(reserved) and job["attempts"] == 2
    assert [p.name for p in nxt.settings.outbox.iterdir()] == ["a.bicubic.x2.png"]  # replaced in place, no -1 copy
    assert [p.name for p in nxt.settings.archive.iterdir()] == ["a.png"]


# --- the input moves only after the done commit -----------------------------------------------------------------------
class CommitRefused(Exception):
    """The database went away at the worst moment: the ``done`` commit does not land."""


def test_the_input_moves_only_after_the_done_commit(make_service):
    svc = make_service()
    inbox_file = svc.settings.inbox / "a.png"
    task = claimed(svc, drop(svc, "a.png"))
    svc.stages.run_task(task, "cpu")
    assert task.error is None
    seen: list[bool] = []

    def refuse(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001 - SQLAlchemy's
        values = parameters.values() if isinstance(parameters, dict) else parameters
        if statement.lstrip().upper().startswith("UPDATE JOBS") and "done" in list(values):
            seen.append(inbox_file.exists())  # where the input is when the done row is written
            raise CommitRefused("the database refused the done commit")

    event.listen(svc.store.engine, "before_cursor_execute", refuse)
    try:
        with pytest.raises(CommitRefused):
            svc.stages.settle([task])
    finally:
        event.remove(svc.store.engine, "before_cursor_execute", refuse)
    assert seen == [True], "the input was moved before its job was committed done"
    assert inbox_file.exists() and not any(svc.settings.archive.iterdir())
    assert db_rows(svc, "SELECT state, input_moved_to FROM jobs") == [{"state": "running", "input_moved_to": None}]
    svc.shutdown()

    nxt = make_service()  # nothing was lost: the next start finishes it, once
    run_until(nxt, lambda: [p.name for p in nxt.settings.archive.iterdir()] == ["a.png"], what="a.png archived")
    (job,) = db_rows(nxt, "SELECT state, input_moved_to FROM jobs")
    assert job == {"state": "done", "input_moved_to": str(nxt.settings.archive / "a.png")}
    assert [p.name for p in nxt.settings.outbox.iterdir()] == ["a.bicubic.x2.png"]


# --- a file replaced after it was read is not this job's input --------------------------------------------------------
def test_an_input_replaced_after_it_was_read_is_not_moved_as_this_jobs_input(make_service, tmp_path):
    svc = make_service()
    inbox_file = svc.settings.inbox / "a.png"
    task = claimed(svc, drop(svc, "a.png", seed=1))
    svc.stages.run_task(task, "cpu")  # the worker has read (and hashed) the first content
    image(tmp_path / "staging" / "a.png", (48, 40), seed=2)
    os.replace(tmp_path / "staging" / "a.png", inbox_file)  # another file under the same name: another inode
    new_bytes = inbox_file.read_bytes()
    for t in svc.stages.settle([task]):
        svc.stages.measure(t)
    (job,) = db_rows(svc, "SELECT state FROM jobs")
    assert job["state"] == "done"  # its output is of the content it read
    assert inbox_file.read_bytes() == new_bytes, "the new file was moved as the old job's input"
    assert not any(svc.settings.archive.iterdir())
    # The new content is a job of its own: the next scan finds it, and it is processed and archived in turn.
    run_until(
        svc,
        lambda: len(db_rows(svc, "SELECT id FROM jobs WHERE state = 'done'")) == 2 and not inbox_file.exists(),
        what="the new file done and archived",
    )
    archived = [p.read_bytes() for p in svc.settings.archive.iterdir()]
    assert archived == [new_bytes]


def test_a_job_whose_input_was_replaced_does_not_claim_an_archive_copy(make_service, tmp_path):
    svc = make_service()
    inbox_file = svc.settings.inbox / "a.png"
    task = claimed(svc, drop(svc, "a.png", seed=1))
    svc.stages.run_task(task, "cpu")
    image(tmp_path / "staging" / "a.png", (48, 40), seed=2)
    os.replace(tmp_path / "staging" / "a.png", inbox_file)
    for t in svc.stages.settle([task]):
        svc.stages.measure(t)
    run_until(
        svc,
        lambda: len(db_rows(svc, "SELECT id FROM jobs WHERE state = 'done'")) == 2 and not inbox_file.exists(),
        what="the new file done and archived",
    )
    first, second = db_rows(svc, "SELECT id, input_moved_to FROM jobs ORDER BY id")
    assert second["input_moved_to"] == str(svc.settings.archive / "a.png")  # the new file's own archive copy
    assert first["input_moved_to"] is None  # the first input was replaced: it went nowhere


# --- PSNR-Y: the border shave is an explicit crop ---------------------------------------------------------------------
def _y(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma on 16..235, written out from the formula (not through daemon.metrics)."""
    rgb = rgb.astype(np.float64)
    return 16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10.0 * math.log10(255.0**2 / float(np.mean((a - b) ** 2)))


@pytest.mark.parametrize("shave", [2, 3, 4])
def test_psnr_y_and_ssim_y_are_those_of_the_explicitly_cropped_images(shave):
    rng = np.random.default_rng(shave)
    h, w = 40, 48
    hr = rng.random((h, w, 3)).astype(np.float32)
    sr = np.clip(hr + rng.normal(0, 0.01, hr.shape), 0, 1).astype(np.float32)
    sr[:shave], sr[-shave:], sr[:, :shave], sr[:, -shave:] = 0, 1, 0, 1  # the border is all wrong
    got = {m.name: m for m in full_reference(sr, hr, shave, ("psnr_y", "ssim_y"))}
    crop = (slice(shave, h - shave), slice(shave, w - shave))
    ys, yh = _y(sr)[crop], _y(hr)[crop]
    assert got["psnr_y"].value == pytest.approx(_psnr(ys, yh), abs=1e-9)
    ssim = structural_similarity(
        ys, yh, data_range=255.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert got["ssim_y"].value == pytest.approx(ssim, abs=1e-9)
    assert got["psnr_y"].shave == shave == got["ssim_y"].shave and f"border {shave} px shaved" in got["psnr_y"].protocol
    assert _psnr(ys, yh) - _psnr(_y(sr), _y(hr)) > 5  # without the shave the figure would be far off


def test_a_benchmark_job_records_psnr_y_of_its_written_output_against_the_cropped_hr(make_service):
    src = SET5 / "HR" / "baby.png"
    if not src.exists():
        pytest.skip(f"Set5 is not at {SET5}")
    s = 4
    svc = make_service(
        rules=[
            {
                "folder": "bench",
                "model": "bicubic",
                "scale": s,
                "mode": "benchmark",
                "metrics": ["psnr_y", "ssim_y"],
                "format": "png",
                "compare": False,
            }
        ]
    )
    (svc.settings.inbox / "bench").mkdir(parents=True, exist_ok=True)
    shutil.copy(src, svc.settings.inbox / "bench" / "baby.png")
    run_until(svc, lambda: db_rows(svc, "SELECT id FROM jobs WHERE metrics_state = 'done'"), what="the job measured")
    (job,) = db_rows(svc, "SELECT * FROM jobs")
    metrics = {m["name"]: m for m in db_rows(svc, "SELECT * FROM metrics WHERE job_id = ?", job["id"])}
    sr = np.asarray(Image.open(job["output_path"]).convert("RGB"), np.float64) / 255.0
    hr = np.asarray(Image.open(src).convert("RGB"), np.float64) / 255.0
    hr = hr[: hr.shape[0] - hr.shape[0] % s, : hr.shape[1] - hr.shape[1] % s]  # modcrop to the scale
    assert sr.shape == hr.shape
    crop = (slice(s, -s), slice(s, -s))
    expected = _psnr(_y(sr)[crop], _y(hr)[crop])
    row = metrics["psnr_y"]
    assert row["value"] == pytest.approx(expected, abs=1e-6)
    assert (row["shave"], row["space"], row["reference"]) == (s, "y-bt601", "hr")
    assert abs(expected - _psnr(_y(sr), _y(hr))) > 0.05  # the border matters on this image: the shave is seen
    assert metrics["ssim_y"]["shave"] == s


# --- metrics on the pixels as written; lr_* rows say shave 0 ----------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_metrics_are_measured_on_the_pixels_as_written(make_service, fmt):
    base = {"model": "bicubic", "scale": 2, "metrics": ["lr_psnr_y", "lr_ssim_y"]}
    svc = make_service(
        rules=[
            {**base, "folder": "lossless", "format": "png"},
            {**base, "folder": "lossy", "format": fmt, "quality": 30},
        ]
    )
    for folder in ("lossless", "lossy"):
        image(svc.settings.inbox / folder / "p.png", (48, 40), seed=3)
    run_until(
        svc,
        lambda: len(db_rows(svc, "SELECT id FROM jobs WHERE metrics_state = 'done'")) == 2,
        what="both jobs measured",
    )
    lr = np.asarray(Image.open(svc.settings.archive / "lossless" / "p.png").convert("RGB"), np.float32) / 255.0
    figures = {}
    for job in db_rows(svc, "SELECT id, folder, output_path FROM jobs"):
        metrics = {m["name"]: m for m in db_rows(svc, "SELECT * FROM metrics WHERE job_id = ?", job["id"])}
        assert set(metrics) == {"lr_psnr_y", "lr_ssim_y"}
        for m in metrics.values():  # the LR-consistency protocol: Y against the input, nothing shaved
            assert (m["shave"], m["space"], m["reference"]) == (0, "y-bt601", "lr-input"), m
            assert "no shave" in m["protocol"]
        # The output file decoded again, downscaled back to the input's size, compared with the input on Y.
        sr = np.asarray(Image.open(job["output_path"]).convert("RGB"), np.float32) / 255.0
        back = np.clip(imresize(sr, (lr.shape[1], lr.shape[0])), 0.0, 1.0)
        assert metrics["lr_psnr_y"]["value"] == pytest.approx(_psnr(_y(back), _y(lr)), abs=1e-6), job["folder"]
        ssim = structural_similarity(
            _y(back), _y(lr), data_range=255.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert metrics["lr_ssim_y"]["value"] == pytest.approx(ssim, abs=1e-6), job["folder"]
        figures[job["folder"]] = metrics["lr_psnr_y"]["value"]
    assert abs(figures["lossless"] - figures["lossy"]) > 0.1  # quality 30 shows: the lossy figure is its own


# --- stale_seconds >= 2 x heartbeat_seconds ---------------------------------------------------------------------------
def test_stale_seconds_must_be_at_least_twice_the_heartbeat(tmp_path):
    ok = load_settings(write_config(tmp_path, heartbeat_seconds=5, stale_seconds=10))
    assert (ok.heartbeat_seconds, ok.stale_seconds) == (5, 10)  # exactly twice is enough
    cfg = write_config(tmp_path, heartbeat_seconds=5, stale_seconds=9.5)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert "stale_seconds (9.5) must be at least twice heartbeat_seconds (5)" in str(err.value)
    assert str(cfg) in str(err.value)
    # The daemon refuses to start with it (and an environment override is checked the same way).
    env = dict(
        os.environ,
        UPSCALED_CONFIG=str(write_config(tmp_path)),
        UPSCALED_HEARTBEAT_SECONDS="5",
        UPSCALED_STALE_SECONDS="9",
    )
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "run"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert res.returncode != 0 and "must be at least twice heartbeat_seconds" in res.stdout + res.stderr
    assert not (tmp_path / "var" / "upscaled.db").exists()  # refused before anything was opened


# --- out of memory: a real MemoryError under RLIMIT_AS, retried with capped doubling backoff --------------------------
def _vm_size() -> int:
    """This process's address space, in bytes (what RLIMIT_AS counts)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _oom_child(config: str, out: str, headroom: int) -> None:
    """Run the big job, attempt after attempt, with the address space capped ``headroom`` bytes above what the
    process uses once warm. The store's clock is set to each job's ``next_attempt_at`` before the next attempt.
    Writes the job row after each attempt to ``out`` (JSON)."""
    settings = load_settings(Path(config))
    now = [T0]
    store = SqlStore(settings.database, clock=lambda: now[0])
    inbox, outbox = Root(settings.inbox), Root(settings.outbox)
    mover = Mover(store, inbox, Root(settings.archive), Root(settings.failed))
    stages = Stages(settings, store, ModelCache(), inbox, outbox, mover, sandbox=shared_sandbox())
    intake = Intake(settings, inbox, shared_sandbox())
    (small,) = store.register([intake.spec(PurePosixPath("small.png"))])
    task = stages.step(worker_id(), "cpu")  # warm: every import and cache on the path is loaded before the cap
    assert task is not None and task.error is None, task and task.error
    (big,) = store.register([intake.spec(PurePosixPath("big.png"))])
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))
    seen = []
    for _ in range(settings.max_attempts + 1):
        task = stages.step(worker_id(), "cpu")
        assert task is not None and task.job.id == big.job.id
        row = store.row(big.job.id)
        seen.append(
            {
                k: v.isoformat() if isinstance(v, dt.datetime) else v
                for k, v in row.items()
                if k in ("state", "attempts", "error_kind", "error", "next_attempt_at", "input_moved_to")
            }
        )
        if row["state"] != "pending":
            break
        now[0] = row["next_attempt_at"]
    Path(out).write_text(json.dumps(seen))


def test_out_of_memory_is_retried_with_doubling_capped_backoff_then_quarantined(tmp_path):
    cfg = write_config(
        tmp_path,
        rules=[{"folder": "", "model": "bicubic", "scale": 4, "metrics": []}],
        max_attempts=4,
        retry_seconds=10,
        retry_max_seconds=25,
    )
    image(tmp_path / "inbox" / "small.png", (16, 16))
    # 2000 x 1500 at x4: the resampler's float32 planes alone are over 700 MB; the cap leaves 300 MB.
    Image.fromarray(np.tile(np.arange(2000, dtype=np.uint8)[None, :, None], (1500, 1, 3))).save(
        tmp_path / "inbox" / "big.png", compress_level=1
    )
    out = tmp_path / "attempts.json"
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_oom_child, args=(str(cfg), str(out), 300 << 20))
    child.start()
    child.join(300)
    assert child.exitcode == 0, f"the child died ({child.exitcode}): a MemoryError must fail a job, not the process"
    attempts = json.loads(out.read_text())
    assert [a["attempts"] for a in attempts] == [1, 2, 3, 4]
    assert {a["error_kind"] for a in attempts} == {"out-of-memory"}
    waits = []
    at = T0
    for a in attempts[:-1]:
        assert a["state"] == "pending"
        nxt = dt.datetime.fromisoformat(a["next_attempt_at"])
        waits.append((nxt - at).total_seconds())
        at = nxt
    assert waits == [10, 20, 25]  # retry_seconds, doubled per attempt, capped at retry_max_seconds
    last = attempts[-1]
    assert last["state"] == "failed" and last["input_moved_to"] == str(tmp_path / "failed" / "big.png")
    reason = json.loads((tmp_path / "failed" / "big.png.error.json").read_text())
    assert reason["kind"] == "out-of-memory" and reason["attempts"] == 4
    assert (tmp_path / "archive" / "small.png").exists()  # the warm-up job, done before the cap


# --- CI: a skip is a failure under UPSCALED_REQUIRE_ALL=1 -------------------------------------------------------------
def test_require_all_turns_every_kind_of_skip_into_a_failure(tmp_path):
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n"
        "def test_runtime():\n    pytest.skip('no server here')\n"
        "@pytest.mark.skipif(True, reason='systemd-analyze is not installed')\n"
        "def test_marker():\n    pass\n"
        "def test_has_a_gpu():\n    pytest.skip('this machine has a GPU; the test needs none')\n"
        "@pytest.mark.xfail(reason='known')\n"
        "def test_xfail():\n    assert False\n"
        "def test_fine():\n    pass\n"
    )
    (tmp_path / "test_module_skip.py").write_text(
        "import pytest\npytest.importorskip('no_such_module_for_upscaled')\ndef test_never():\n    pass\n"
    )

    def run(require: str) -> str:
        env = dict(os.environ, UPSCALED_REQUIRE_ALL=require, PYTHONPATH=str(ROOT))
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-p",
                "tests.conftest",
                "--continue-on-collection-errors",
                "-rfEs",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        return res.stdout + res.stderr

    strict = run("1")
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 2 errors" in strict, strict
    for reason in ("no server here", "systemd-analyze is not installed", "could not import 'no_such_module_for"):
        assert f"UPSCALED_REQUIRE_ALL=1 and this would skip: {reason}" in strict
    lenient = run("0")
    assert "1 passed, 4 skipped, 1 xfailed" in lenient, lenient
