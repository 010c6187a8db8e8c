"""The worker stepped in one thread over the in-memory store, with a fake clock: every stage, every disposition.

Real files in temp folders and a real model (nearest-neighbour resampling: exact and instant); no threads, no
inotify, no subprocess, no sleeps.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from daemon.config import load_settings
from daemon.dispositions import Mover
from daemon.fsops import Root
from daemon.intake import Intake
from daemon.jobs import MemoryStore, worker_id
from daemon.worker import Stages
from models.backends import Backend, cpu_only
from models.base import FunctionUpscaler
from models.errors import OutOfMemoryError
from models.registry import ModelCache, Registry
from tests.conftest import FakeClock, shared_sandbox, write_config

T0 = FakeClock().start


class Rig:
    """A worker over a memory store, with the four folders of a real settings file."""

    def __init__(self, tmp: Path, **keys) -> None:
        rules = keys.pop("rules", [{"folder": "", "model": "nearest", "scale": 2, "format": "png"}])
        self.settings = load_settings(write_config(tmp, rules=rules, **keys))
        s = self.settings
        self.clock = FakeClock()
        self.store = MemoryStore(self.clock)
        self.inbox, self.outbox = Root(s.inbox), Root(s.outbox)
        self.archive, self.failed = Root(s.archive), Root(s.failed)
        self.mover = Mover(self.store, self.inbox, self.archive, self.failed)
        self.intake = Intake(s, self.inbox, shared_sandbox())
        self.outcomes: list[tuple[int, str]] = []
        self.stages = Stages(
            s,
            self.store,
            ModelCache(),
            self.inbox,
            self.outbox,
            self.mover,
            node="n",
            on_outcome=lambda t, status: self.outcomes.append((t.job.id, status)),
            sandbox=shared_sandbox(),
        )

    def drop(self, name: str, size=(24, 16), seed: int = 0, **save) -> PurePosixPath:
        rng = np.random.default_rng(seed)
        path = self.settings.inbox / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, **save)
        return PurePosixPath(name)

    def admit(self, rel: PurePosixPath):
        spec = self.intake.spec(rel)
        return self.store.register([spec], node="n")[0], spec

    def step(self):
        return self.stages.step(worker_id(), "cpu")


@pytest.fixture
def rig(tmp_path):
    return Rig(tmp_path)


def test_a_file_goes_through_every_stage_once(rig):
    rel = rig.drop("a.png", seed=1)
    reg, _ = rig.admit(rel)
    task = rig.step()
    assert task is not None and task.error is None
    job = rig.store.get(reg.job.id)
    out = rig.settings.outbox / "a.nearest.x2.png"
    assert job.state == "done" and job.output_path == str(out)
    got = np.asarray(Image.open(out))
    src = np.asarray(Image.open(rig.settings.archive / "a.png"))
    assert got.shape == (32, 48, 3) and np.array_equal(got[::2, ::2], src)  # nearest x2: every pixel twice
    assert job.input_moved_to == str(rig.settings.archive / "a.png") and not (rig.settings.inbox / "a.png").exists()
    assert set(rig.store.metrics_of(job.id)) == {"lr_psnr_y", "lr_ssim_y"}  # brisque: no model files here
    assert job.metrics_state == "done" and rig.outcomes == [(job.id, "done")]
    assert rig.step() is None  # nothing left


def test_metrics_that_fell_behind_a_burst_are_measured_from_the_archived_input(rig):
    """The runner lets go of the pixels of all but a few jobs waiting for their metrics: those are measured
    after the input moved to the archive, from the files, and come out the same as from the pixels."""
    for seed, (name, keep) in enumerate((("a.png", True), ("b.png", False))):
        reg, _ = rig.admit(rig.drop(name, seed=seed))
        (task,) = rig.stages.claim(worker_id(), 1)
        rig.stages.run_task(task, "cpu")
        (waiting,) = rig.stages.settle([task])
        assert not (rig.settings.inbox / name).exists()  # archived before any metric
        if not keep:
            waiting.work, waiting.data = None, None  # what the runner does past its measure buffer
        rig.stages.measure(waiting)
        job = rig.store.get(reg.job.id)
        assert job.metrics_state == "done", (name, job.metrics_state)
        assert set(rig.store.metrics_of(job.id)) == {"lr_psnr_y", "lr_ssim_y"}, name
    # From the pixels or from the files: the same figures.
    from_pixels = rig.store.metrics_of(1)
    again = {m.name: m.value for m in rig.stages.remeasure(rig.store.get(1), rig.archive)}
    assert again == pytest.approx(from_pixels)


def test_a_bad_file_fails_its_own_job_with_its_reason_beside_it(rig):
    (rig.settings.inbox / "bad.png").write_text("not an image")
    reg, spec = rig.admit(PurePosixPath("bad.png"))
    assert spec.failure is not None and reg.job.state == "running"  # failed at the door, never offered
    from daemon.worker import Task

    rig.stages.settle([Task(job=reg.job, root=rig.inbox, rel=spec.rel, error=spec.failure)])
    job = rig.store.get(reg.job.id)
    assert job.state == "failed" and job.error_kind == "decode"
    reason = json.loads((rig.settings.failed / "bad.png.error.json").read_text())
    assert reason["kind"] == "decode" and "not an image" in reason["error"]
    assert (rig.settings.failed / "bad.png").read_text() == "not an image"
    assert job.input_moved_to == str(rig.settings.failed / "bad.png")


def test_the_output_path_is_reserved_at_claim_and_reused_by_a_retry(rig):
    (rig.settings.outbox / "a.nearest.x2.png").write_bytes(b"someone else's file")
    reg, _ = rig.admit(rig.drop("a.png"))
    task = rig.stages.claim(worker_id(), 1)[0]
    reserved = rig.settings.outbox / "a.nearest.x2-1.png"  # never over a file that is not ours
    assert rig.store.get(reg.job.id).output_path == str(reserved)
    rig.store.release(reg.job.id)  # a crash after the claim: the job goes back to the queue with its path
    task = rig.step()
    assert task.job.output_path == str(reserved) and reserved.exists()
    assert (rig.settings.outbox / "a.nearest.x2.png").read_bytes() == b"someone else's file"


def test_an_input_replaced_after_registration_is_not_processed_nor_moved(rig):
    rel = rig.drop("a.png", seed=1)
    reg, _ = rig.admit(rel)
    rig.drop("a.png", seed=2)  # other bytes under the same name, after it was registered
    task = rig.step()
    assert task.error is not None and task.error.kind == "input-changed"
    assert rig.store.get(reg.job.id).state == "failed"
    assert (rig.settings.inbox / "a.png").exists() and not any(rig.settings.failed.iterdir())
    assert not any(rig.settings.outbox.iterdir())


def test_a_folder_swapped_for_a_link_after_registration_reads_nothing_outside(rig, tmp_path):
    rel = rig.drop("sub/a.png", seed=1)
    reg, _ = rig.admit(rel)
    outside = tmp_path / "outside"
    outside.mkdir()
    (rig.settings.inbox / "sub" / "a.png").rename(outside / "a.png")
    (rig.settings.inbox / "sub").rmdir()
    os.symlink(outside, rig.settings.inbox / "sub")  # the attacker's swap
    task = rig.step()
    assert task.error is not None and task.error.kind == "unsafe-path"
    assert (outside / "a.png").exists()  # not read, not archived, not quarantined
    assert not any(rig.settings.archive.iterdir()) and not list(rig.settings.outbox.rglob("*.png"))


def test_a_symlinked_outbox_folder_is_never_written_through(tmp_path):
    rig = Rig(tmp_path, rules=[{"folder": "photos", "model": "nearest", "scale": 2, "format": "png"}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, rig.settings.outbox / "photos")
    reg, _ = rig.admit(rig.drop("photos/a.png"))
    task = rig.step()
    assert task.error is not None and task.error.kind == "unsafe-path"
    assert list(elsewhere.iterdir()) == []
    assert rig.store.get(reg.job.id).state == "failed" and (rig.settings.failed / "photos" / "a.png").exists()


def test_a_one_off_job_never_moves_its_input(tmp_path):
    rig = Rig(tmp_path)
    out = Root(tmp_path / "out")
    stages = Stages(rig.settings, rig.store, ModelCache(), None, out, None, sandbox=shared_sandbox())
    src = tmp_path / "mine.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    from daemon.intake import inspect
    from daemon.jobs import JobSpec

    with Root(tmp_path, create=False) as folder:
        sha, probe, st = inspect(folder, PurePosixPath("mine.png"), rig.settings, shared_sandbox())
    (reg,) = rig.store.register(
        [
            JobSpec(
                sha=sha,
                rule=rig.settings.rules[0],
                rel=PurePosixPath("mine.png"),
                input_path=str(src),
                source="cli",
                input_format=probe.format,
            )
        ]
    )
    task = stages.step(worker_id(), "cpu", job_id=reg.job.id)
    assert task.error is None and src.exists() and (tmp_path / "out" / "mine.nearest.x2.png").exists()
    assert rig.store.get(reg.job.id).input_moved_to is None


def load(entry, scale: float, _ctx) -> FunctionUpscaler:
    """The ``load`` of a stand-in backend whose model runs out of memory on every call, as a GPU would (no GPU
    here): it takes the place of the OpenCV backend in a :class:`Registry` of the test's own."""

    def oom(_rgb: np.ndarray) -> np.ndarray:
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")

    return FunctionUpscaler(entry.id, "opencv", scale, oom, run_u8=oom)


def test_out_of_memory_is_retried_by_the_worker_with_doubling_capped_backoff_counted_then_quarantined(tmp_path):
    """The worker's own settle step (not the policy alone): each out-of-memory attempt is committed for a retry at
    ``retry_seconds`` doubling up to ``retry_max_seconds``, counted in ``upscaled_jobs_total{status="retried"}``
    (the disk-full and OOM alerts read it), and after ``max_attempts`` the job fails and its input goes to failed/."""
    from daemon.telemetry import Telemetry

    rig = Rig(
        tmp_path,
        rules=[{"folder": "", "model": "fsrcnn", "scale": 2, "format": "png"}],
        max_attempts=3,
        retry_seconds=30.0,
        retry_max_seconds=50.0,
    )
    rig.stages.cache = ModelCache(Registry([Backend("opencv", __name__, None, resolve_device=cpu_only)]))
    rig.stages.telemetry = telemetry = Telemetry("n", "0", {})
    reg, _ = rig.admit(rig.drop("a.png"))

    def retried() -> float:
        body = telemetry.render()[0].decode()
        line = [x for x in body.splitlines() if x.startswith("upscaled_jobs_total{") and 'status="retried"' in x]
        return float(line[0].rsplit(" ", 1)[1]) if line else 0.0

    waits = []
    for attempt in (1, 2):
        task = rig.step()
        assert task is not None and task.error is not None and task.error.kind == "out-of-memory", task
        job = rig.store.get(reg.job.id)
        assert job.state == "pending" and job.attempts == attempt and job.error_kind == "out-of-memory", job
        waits.append((job.next_attempt_at - rig.clock.now).total_seconds())
        assert retried() == attempt, f"attempt {attempt} was retried but upscaled_jobs_total{{retried}} = {retried()}"
        assert rig.step() is None, "a job waiting for its retry time must not be claimed before it"
        rig.clock.now = job.next_attempt_at
    assert waits == [30.0, 50.0], f"retry delays {waits}: expected 30 s, then 60 s capped at retry_max_seconds 50"
    task = rig.step()
    job = rig.store.get(reg.job.id)
    assert job.state == "failed" and job.attempts == 3 and job.error_kind == "out-of-memory", job
    assert (rig.settings.failed / "a.png").exists() and not (rig.settings.inbox / "a.png").exists()
    assert retried() == 2 and rig.outcomes == [(1, "retried"), (1, "retried"), (1, "failed")]


def test_a_full_disk_is_retried_until_fixed_whatever_max_attempts_says(tmp_path):
    from daemon.dispositions import Policy, RetryAt, after_run
    from daemon.errors import DiskFullError

    rig = Rig(tmp_path, max_attempts=1)
    rig.admit(rig.drop("a.png"))
    job = rig.store.claim("w")[0]
    forever = after_run(job, DiskFullError("full"), Policy.of(rig.settings), T0)  # the environment's fault
    assert isinstance(forever, RetryAt), forever


def test_a_failed_input_in_the_inbox_after_a_crash_is_quarantined_by_the_next_scan(rig):
    from daemon.dispositions import LeaveToOwner, Policy, Quarantine, for_existing

    reg, spec = rig.admit(rig.drop("a.png"))
    job = rig.store.claim("host:1/w")[0]
    rig.store.fail(job.id, "decode", "bad", owner="host:1/w")  # committed; the crash came before the move
    job = rig.store.get(job.id)
    policy = Policy.of(rig.settings)
    assert isinstance(for_existing(job, spec.rel, spec.input_id, policy, T0, True, True), LeaveToOwner)
    later = T0 + dt.timedelta(seconds=policy.stale_seconds + 1)
    assert isinstance(for_existing(job, spec.rel, spec.input_id, policy, later, True, True), Quarantine)
    assert isinstance(for_existing(job, spec.rel, spec.input_id, policy, T0, False, True), Quarantine)


def test_the_metrics_backlog_is_bounded_and_every_spilled_job_is_measured_once(rig):
    """Done jobs waiting for their metrics: at most ``backlog_max`` are held in memory, the rest are left to the
    store (issue 26: each held one cost about 2 KB, so a stream the metrics could not keep up with grew the daemon
    without end). The measurer reads them back a page at a time, each job is measured once, and none is kept while
    the store holds spilled ones."""
    from daemon.worker import Runner

    runner = Runner(rig.stages, ["cpu"], 1, lambda _name: worker_id())
    runner.backlog_max, runner.page = 3, 2
    measured: list[int] = []
    seeds = iter(range(100))  # a content of its own for each file
    measure = rig.stages.measure
    rig.stages.measure = lambda task: (measured.append(task.job.id), measure(task))[1]

    def settle(names: list[str]) -> None:  # read, infer, write each; then one done commit for all, as a burst
        for name in names:
            rig.admit(rig.drop(name, seed=next(seeds)))
        for task in rig.stages.claim(worker_id(), limit=len(names)):
            rig.stages.run_task(task, "cpu")
            runner._settle_q.put(task)
        runner._settle()

    settle([f"a{i}.png" for i in range(8)])
    assert runner.backlog() == 3, "the backlog holds at most backlog_max tasks; the others wait in the store"
    for _ in range(5):  # the three held, then the first page read back from the store
        assert runner.measure_one()
    settle(["b0.png", "b1.png"])  # while jobs are spilled, a new one is spilled too, never held
    assert runner.backlog() == 0, "a job settled while others are spilled must wait in the store with them"
    while runner.measure_one():
        pass
    jobs = [rig.store.get(i) for i in range(1, 11)]
    assert all(j.state == "done" and j.metrics_state == "done" for j in jobs), [(j.id, j.metrics_state) for j in jobs]
    assert sorted(measured) == list(range(1, 11)), f"each job measured exactly once, got {sorted(measured)}"
    assert measured[:3] == [1, 2, 3] and measured[3:8] == [4, 5, 6, 7, 8], "the held ones first, then the oldest"


def test_the_settle_beat_is_fresh_when_its_commit_starts(rig):
    """The settle thread waits for its batch (up to half a second each pass); that wait is not silence. Its commit
    starts with a fresh beat, so the commit's own time is all that counts against the watchdog."""
    from daemon.worker import Runner

    now = [100.0]
    runner = Runner(rig.stages, ["cpu"], 1, lambda _name: worker_id(), clock=lambda: now[0])
    rig.admit(rig.drop("a.png", seed=1))
    (task,) = rig.stages.claim(worker_id(), limit=1)
    rig.stages.run_task(task, "cpu")
    runner._settle_q.put(task)
    beat = runner.beats["settle"]
    beat.at = 100.0  # the pass began here, then waited for its batch
    now[0] = 100.45
    silent: list[float] = []
    settle = rig.stages.settle
    rig.stages.settle = lambda batch: (silent.append(beat.silent_for(now[0])), settle(batch))[1]
    runner._settle()
    assert silent == [0.0], f"the settle commit started {silent[0]:.2f} s silent: the wait for its batch counted"
    assert rig.store.get(task.job.id).state == "done"
