"""The worker: claim -> read -> infer -> write -> settle -> measure, one job or many at once.

Each job is a :class:`Task` that moves through the stages of :class:`Stages`:

1. **claim**: the job is moved to running under this worker and its output path reserved, in one commit (a claim
   takes several jobs at once while the queue is deep: one commit for all of them);
2. **read**: the input is opened through the inbox's directory handle and passed, as a descriptor, to a sandbox
   process (:mod:`daemon.sandbox`), which reads exactly the registered size, hashes what it reads and decodes it;
   the hash is checked against the sha256 it was registered with (the bytes decoded are the bytes hashed), and the
   pixels, mapped from the sandbox's memory, are prepared for the model;
3. **infer**: the model, on the task's device (a thread per device and worker), then the finishing resize;
4. **write**: encoded and written atomically to the reserved path (temp file, fsync, rename, fsync the folder);
5. **settle**: the outcome is committed (``done``, several jobs in one commit while they queue up; or failed, or
   retried later), and only then is the input moved (archive/ or failed/, see :mod:`daemon.dispositions`);
6. **measure**: the metrics, computed after the output is durable and the job recorded, in a later commit.

:meth:`Stages.step` runs one job through all of them in the calling thread: the unit tests step it over the
in-memory store with a fake clock and an identity upscaler, and ``upscaled process`` runs each file that way.
:class:`Runner` runs them on threads joined by bounded queues, so that the next file is decoded and the last one
encoded and written while the model runs: on a GPU that is what keeps the GPU busy, and on a CPU the encoder and the
database overlap the model. The queues are bounded by a task count and by the bytes of pixels in flight, so memory
stays bounded whatever arrives. The failpoints of :mod:`daemon.failpoints` mark each crash window.
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from daemon import failpoints, imageio, logs, pipeline
from daemon.config import LiveSettings, Settings, UsesSettings
from daemon.dispositions import Mover, Policy, RetryAt, after_run
from daemon.errors import InputChangedError, InternalError, PoisonJobError, UnsafePathError, reading
from daemon.fsops import Root, display, fit_name, text_form
from daemon.hooks import HookEvent, HookRunner
from daemon.jobs import Finished, Job, JobStore
from daemon.media import metadata as md
from daemon.metrics import Brisque, Metric
from daemon.sandbox import Sandbox
from daemon.telemetry import STAGES as TELEMETRY_STAGES
from daemon.telemetry import Telemetry
from models import progress
from models.catalog import get_entry
from models.errors import OutOfMemoryError, UpscaledError, WeightsCorruptError, WeightsMissingError
from models.registry import LoadContext, ModelCache
from models.weights import fetch_command, locate

# A stage that is one long call and cannot beat (decode, the final resize, encode, the metrics) is given this long
# per output pixel before its thread counts as silent: 5 s per megapixel, far more than any of them needs
# (docs/performance.md, "Constants from measurements"). A hung call is still caught, later by that much. The model's
# tiles and denoising steps beat on their own.
SECONDS_PER_PIXEL = 5e-6
SUFFIX_MEMORY = 4096  # output names whose last -N suffix is remembered
SUSPECT_CHECK_SECONDS = 10.0  # how often the feeder looks for jobs taken back by another node's recovery


@dataclass
class Beat:
    """A thread's sign of life, for the watchdog, STATUS= and /livez. Only its own thread writes it."""

    name: str
    at: float
    task: Task | None = None
    stage: str = ""
    busy: bool = False
    next_progress_write: float = 0.0
    allowed_until: float = 0.0  # a stage that cannot beat is not silence before this
    failing_since: float | None = None  # the first of the passes in a row that raised; None once one did not
    failures: int = 0  # passes of the thread's loop in a row that raised
    error: str = ""  # what the last of them raised

    def failed(self, now: float, exc: BaseException) -> None:
        """A pass of the thread's loop raised. A loop that raises on every pass makes no progress however often it
        beats on its way: :meth:`silent_for` counts from the first failed pass until one passes."""
        if self.failing_since is None:
            self.failing_since = now
        self.failures += 1
        first = str(exc).splitlines()[0] if str(exc) else ""  # SQLAlchemy's next lines are the statement
        self.error = f"{type(exc).__name__}: {first}"[:300]

    def passed(self, now: float) -> None:
        """A pass of the thread's loop ended without raising: a sign of life, and the end of a run of failures."""
        self.at, self.failing_since, self.failures, self.error = now, None, 0, ""

    def start(self, task: Task, stage: str, now: float, pixels: int = 0) -> None:
        """``task`` enters ``stage``, a call that may run for ``pixels`` x :data:`SECONDS_PER_PIXEL` unheard."""
        self.task, self.busy, self.stage, self.at = task, True, stage, now
        self.allowed_until = now + pixels * SECONDS_PER_PIXEL

    def end(self, now: float) -> None:
        self.task, self.busy, self.stage, self.at, self.allowed_until = None, False, "", now, 0.0

    def silent_for(self, now: float) -> float:
        """Seconds since the last sign of life (since the first of the failed passes, while every pass fails), or 0
        while a long call is within its allowance."""
        if self.failing_since is not None:
            return now - self.failing_since
        return 0.0 if now < self.allowed_until else now - self.at


@dataclass
class Task:
    """One job on its way through the stages."""

    job: Job
    root: Root  # where the input is read from
    rel: PurePosixPath  # the input under ``root``
    out_root: Root | None = None  # where the output goes (None: a job that fails before it has one)
    out_rel: PurePosixPath | None = None
    timer: pipeline.Timer = field(default_factory=pipeline.Timer)
    work: pipeline.Work | None = None
    data: bytes | None = None
    fmt: str = ""
    device: str = ""
    error: UpscaledError | None = None
    metrics: list[Metric] = field(default_factory=list)
    weight: int = 0  # bytes of pixels it holds while in flight
    moved_to: str | None = None
    own_root: bool = False  # `root` was opened for this task alone (a one-off run's folder)

    @property
    def name(self) -> str:
        return self.job.name

    def pixels_in(self) -> int:
        """The input's pixels, all frames, from its header (0 where unknown)."""
        j = self.job
        return (j.input_width or 0) * (j.input_height or 0) * max(1, j.frames)

    def pixels_out(self) -> int:
        """The output's pixels, all frames: as planned once decoded, else from the header and the rule's scale."""
        if self.work is not None:
            return self.work.pixels_out
        return int(self.pixels_in() * self.job.rule.final_scale**2)

    def close(self) -> None:
        """Let go of a folder handle opened for this task."""
        if self.own_root:
            self.root.close()


Outcome = Callable[[Task, str], None]  # (task, status) after its commit: done, failed, retried, lost


class Stages(UsesSettings):
    """The stage functions, with everything they touch injected. Thread-safe: each task is in one stage at a time.

    ``inbox`` is where watch jobs are read from; ``outbox`` where outputs go (``upscaled process`` passes its
    ``--out`` folder). ``mover`` is None for one-off runs, whose inputs never move. ``on_outcome`` hears every
    committed outcome (telemetry, hooks, the service's bookkeeping).
    """

    def __init__(
        self,
        settings: Settings | LiveSettings,
        store: JobStore,
        cache: ModelCache,
        inbox: Root | None,
        outbox: Root,
        mover: Mover | None,
        node: str | None = None,
        on_outcome: Outcome | None = None,
        clock: Callable[[], float] = time.monotonic,
        telemetry: Telemetry | None = None,
        hooks: HookRunner | None = None,
        *,
        sandbox: Sandbox,
    ) -> None:
        self.live = LiveSettings.of(settings)
        self.sandbox = sandbox
        self.store = store
        self.cache = cache
        self.inbox, self.outbox = inbox, outbox
        self.mover = mover
        self.node = node
        self.on_outcome = on_outcome or (lambda task, status: None)
        self.clock = clock
        self.telemetry = telemetry
        self.hooks = hooks
        self.log = logs.get()
        self._brisque: Brisque | bool = False  # False: not found yet
        self._brisque_lock = threading.Lock()
        self._suffixes: dict[str, int] = {}  # output name -> the last -N given it (insertion order: oldest first)
        self._suffix_lock = threading.Lock()

    @property
    def policy(self) -> Policy:
        return Policy.of(self.settings)

    # --- 1. claim --------------------------------------------------------------------------------------------------
    def plan_output(self, job: Job, taken: Callable[[str], bool]) -> str:
        """The output path of ``job``: the rule's name in the input's folder of the outbox, or ``-1``, ``-2``, ...
        where that name holds a file or belongs to another job (an output is never overwritten)."""
        fmt = pipeline.output_format(job.rule, job.input_format)
        # Output names are UTF-8 whatever the input's name holds (\xNN for other bytes): the path goes into the
        # database, and other programs read the outbox.
        rel = PurePosixPath(text_form(str(job.rel)))
        rel_dir = rel.parent if job.source == "watch" else PurePosixPath()
        plan = (
            pipeline.size_plan(job.rule, job.input_width, job.input_height)[0]
            if job.input_width and job.input_height
            else None
        )
        date = (job.created_at or self.store.clock()).date().isoformat()
        target = rel_dir / pipeline.output_name(job.rule, rel, fmt, plan, date)
        candidate = target
        try:
            if self.outbox.exists(target) or taken(str(self.outbox.abs(target))):
                candidate = self._next_free(target, taken)
        except UnsafePathError:
            pass  # a folder on the way is a link: the write says so, and the job fails with that reason
        return str(self.outbox.abs(candidate))

    def _next_free(self, target: PurePosixPath, taken: Callable[[str], bool]) -> PurePosixPath:
        """The first free ``<stem>-N<suffix>`` after the last one this process gave ``target``: a thousand inputs
        that share an output name cost a thousand probes, not half a million."""
        key = str(target)
        with self._suffix_lock:
            n = self._suffixes.pop(key, 0)
        while True:
            n += 1
            candidate = target.with_name(fit_name(f"{target.stem}-{n}{target.suffix}"))
            if not (self.outbox.exists(candidate) or taken(str(self.outbox.abs(candidate)))):
                break
        with self._suffix_lock:
            self._suffixes[key] = n
            while len(self._suffixes) > SUFFIX_MEMORY:
                self._suffixes.pop(next(iter(self._suffixes)))
        return candidate

    def claim(
        self, worker: str, limit: int = 1, job_id: int | None = None, root: Root | None = None, alone: bool = False
    ) -> list[Task]:
        """Claim up to ``limit`` jobs (their outputs reserved in the same commit) and make them tasks (``root``: a
        one-off job's folder; ``alone``: one job to run alone in flight, jobs taken back after a crash first). A job
        whose task cannot be made is failed with the reason, never left running."""
        s = self.settings
        jobs = self.store.claim(
            worker,
            node=self.node,
            limit=limit,
            job_id=job_id,
            folders=s.serve_folders if self.node else None,
            source="watch" if self.mover is not None else None,
            plan=self.plan_output,
            alone=alone,
        )
        if jobs:
            failpoints.hit("after-claim")
        tasks = []
        for j in jobs:
            try:
                tasks.append(self.task(j, root))
            except (OSError, UpscaledError) as exc:  # claimed, so it must end: failed, never left running
                error = exc if isinstance(exc, UpscaledError) else InternalError(f"cannot reach its input: {exc}")
                self.store.fail(j.id, error.kind, str(error), owner=j.worker)
                self.log.warning("job.failed", job=j.id, file=display(j.name), kind=error.kind, error=str(error))
        return tasks

    def task(self, job: Job, root: Root | None = None) -> Task:
        """The task of a claimed job. ``root``: the folder its input is in, for a one-off run (``upscaled
        process`` holds it open); watch jobs are in the inbox.

        Raises:
            InternalError: its output path is not in the outbox.
            OSError: a one-off job's folder cannot be opened.
        """
        own = False
        if job.source == "watch":
            assert self.inbox is not None
            root = self.inbox
        elif root is None:  # a one-off job taken up again: its folder by the path recorded with it
            root, own = Root(Path(job.input_path).parent, create=False), True
        out = self.outbox.contains(Path(job.output_path)) if job.output_path else None
        if out is None:
            if own:
                root.close()
            raise InternalError(f"job {job.id}: its output {job.output_path} is not under {self.outbox.path}")
        return Task(job=job, root=root, rel=job.rel, out_root=self.outbox, out_rel=out, own_root=own)

    def beating(self, beat: Beat | None) -> Callable[[], None] | None:
        """A sign of life for ``beat``'s thread, to call while it waits on the sandbox."""
        if beat is None:
            return None

        def touch() -> None:
            beat.at = self.clock()

        return touch

    # --- 2. read ---------------------------------------------------------------------------------------------------
    def read(self, task: Task, beat: Callable[[], None] | None = None) -> None:
        """Pass the input, opened through its folder's handle, to the sandbox, which reads exactly its registered
        size, hashes and decodes it; check the hash is the registered one; prepare the pixels for the model.
        ``beat``: called while the sandbox works (at least twice a second).

        Raises:
            InputChangedError: its bytes are not the ones registered (replaced, rewritten, grown or shrunk since).
            UnsafePathError: it (or a folder on its path) is a symbolic link now, or not a regular file.
            UnreadableFileError, DecodeError, ImageTooLargeError, ImageTooSmallError, DecodeLimitError,
            DecodeTimeoutError, DecoderCrashError, ...
        """
        job = task.job
        with task.timer.stage("decode"):
            failpoints.hit("in-decode", job.name)
            try:
                with reading(job.name):
                    fd, st = task.root.open_file(task.rel)
            except FileNotFoundError:
                raise InputChangedError(f"{job.name} disappeared before it was processed") from None
            try:
                if job.input_size is not None and st.st_size != job.input_size:
                    raise InputChangedError(
                        f"{job.name} changed size after it was registered ({job.input_size} bytes then, "
                        f"{st.st_size} now); the new content is a job of its own"
                    )
                s = self.settings
                decoded, sha = self.sandbox.decode(fd, job.input_size, job.name, s.max_pixels, s.max_frames, beat)
            finally:
                os.close(fd)
            if sha != job.sha:
                raise InputChangedError(
                    f"{job.name} changed after it was registered; the new content is a job of its own"
                )
            task.work = pipeline.prepare(job.rule, decoded, self.settings)
        w = task.work
        task.weight = w.src.nbytes + w.pixels_out * 3 * (2 if w.bits == 16 else 1) * 2

    # --- 3. infer --------------------------------------------------------------------------------------------------
    def infer(self, task: Task, device: str, beat: Beat | None = None) -> None:
        """Run the model on the task's pixels on ``device`` (a rule's own ``device`` wins).

        Raises:
            ModelError subclasses (weights, backend), OutOfMemoryError, and what the model raises.
        """
        rule, work = task.job.rule, task.work
        assert work is not None
        ctx = LoadContext(self.settings.weights_dir, rule.device or device, rule.tile, rule.precision)
        with task.timer.stage("load"):
            backend = rule.backend()
            if backend.any_scale:  # a resampling filter at this image's own factor: nothing to load or cache
                up = backend.load(get_entry(rule.model), work.native, ctx)
            else:
                up, _ = self.cache.get(rule.model, work.native, ctx)
        task.device = up.device
        sink = (lambda done, total, unit="tile": self._progress(task, beat, done, total, unit)) if beat else None
        if self.telemetry is not None:
            self.telemetry.job_started(up.device)
        try:
            failpoints.hit("in-infer")
            with task.timer.stage("infer"):
                if sink is None:
                    pipeline.run(rule, work, up, rule.model_params(), self.brisque)
                else:
                    with progress.reporting(sink):
                        pipeline.run(rule, work, up, rule.model_params(), self.brisque)
        finally:
            if self.telemetry is not None:
                self.telemetry.job_ended(up.device)

    def _progress(self, task: Task, beat: Beat, done: int, total: int, unit: str) -> None:
        """From inside a model call: a tile or a denoising step is done. Feeds STATUS=, the job row and the log."""
        now = self.clock()
        beat.at, beat.stage = now, f"{unit} {done}/{total}"
        # A stage that beats is held to its beats: the allowance of a call that cannot beat is for what follows the
        # last tile or step (the final resize, the frame's assembly), never for the time between two tiles.
        beat.allowed_until = now + task.pixels_out() * SECONDS_PER_PIXEL if done == total else 0.0
        if now >= beat.next_progress_write or done == total:
            beat.next_progress_write = now + 2.0  # at most one row update and log line every 2 s
            self.store.progress(task.job.id, beat.stage)
            self.log.info("job.progress", job=task.job.id, file=task.name, progress=beat.stage)

    # --- 4. write --------------------------------------------------------------------------------------------------
    def write(self, task: Task) -> None:
        """Encode and write the output atomically to its reserved path (and the benchmark comparison beside it).

        Raises:
            DiskFullError, OutputUnavailableError (retried until fixed), OutputError, UnsafePathError.
        """
        job, work = task.job, task.work
        assert work is not None
        task.fmt = pipeline.output_format(job.rule, job.input_format or work.decoded.format)
        with task.timer.stage("encode"):
            prepared = None
            if md.parses(work.decoded.meta, job.rule.metadata):  # EXIF or XMP to rewrite: parsed in the sandbox
                prepared, notes = self.sandbox.prepare(work.decoded.meta, job.rule.metadata, task.fmt, work.size)
                work.notes += notes
            task.data = pipeline.encode(job.rule, work, task.fmt, prepared)
        assert task.out_root is not None and task.out_rel is not None
        with task.timer.stage("write"):
            task.out_root.write_atomic(task.out_rel, task.data)
            if job.rule.mode == "benchmark" and job.rule.compare and work.hr is not None:
                cmp_rel = task.out_rel.with_name(fit_name(task.out_rel.stem + ".compare.png"))
                task.out_root.write_atomic(cmp_rel, imageio.encode(pipeline.comparison_image(work), "png")[0])
        failpoints.hit("after-write")

    # --- 5. settle -------------------------------------------------------------------------------------------------
    def settle(self, tasks: list[Task]) -> list[Task]:
        """Commit the outcomes of ``tasks`` (the successes in one transaction), then move their inputs. Returns the
        tasks whose metrics are still to be measured."""
        ok = [t for t in tasks if t.error is None]
        measure = []
        if ok:
            plans = {t.job.id: self._archive_plan(t) for t in ok}
            results = []
            for t in ok:
                times = dict(t.timer.times)
                times["queue"] = t.job.queue_seconds()
                times["total"] = sum(v for k, v in times.items() if k != "queue")
                fields = dict(t.work.fields if t.work else {}, **{f"t_{k}": v for k, v in times.items()})
                plan = plans[t.job.id]
                results.append(
                    Finished(
                        t.job.id,
                        t.job.worker,
                        fields,
                        archive_path=plan[1],
                        metrics_pending=bool(t.job.rule.metric_names),
                    )
                )
            committed = self.store.finish(results)
            failpoints.hit("after-commit")
            for t, done in zip(ok, committed, strict=True):
                if not done:
                    self.log.warning(
                        "job.lease_lost",
                        job=t.job.id,
                        file=t.name,
                        note="another node owns this job now; its result is kept",
                    )
                    self.on_outcome(t, "lost")
                    continue
                self._archive(t, plans[t.job.id][0])
                self._log_done(t)
                self.report(t, "done")
                if t.job.rule.metric_names:
                    measure.append(t)  # its done hooks run once its metrics are recorded
                else:
                    self._hook(t, "done")
                self.on_outcome(t, "done")
            if ok and any(c for c in committed):
                failpoints.hit("after-archive")
        for t in tasks:
            if t.error is not None:
                self._settle_error(t)
        return measure

    def _archive_plan(self, t: Task) -> tuple[PurePosixPath | None, str | None]:
        """(archive name, its absolute path) to commit with ``done``; (None, None): deleted, or a one-off run."""
        if self.mover is None or self.settings.delete_inputs:
            return None, None
        rel = self.mover.archive_name(t.rel)
        return rel, str(self.mover.archive_root.abs(rel))

    def _archive(self, t: Task, planned: PurePosixPath | None) -> None:
        """The input of a job just committed ``done`` goes to ``planned`` in the archive (the name committed with it),
        or is deleted (``delete_inputs``)."""
        if self.mover is None:
            return
        action = after_run(t.job, None, self.policy, self.store.clock(), planned)
        # The job as committed: a move to another name than planned (taken meanwhile) is recorded; None (gone:
        # another node's reconcile moved it and records where; or kept after an error: the rescan moves it to the
        # planned name) leaves the committed path as it is.
        committed = None if planned is None else str(self.mover.archive_root.abs(planned))
        job = replace(t.job, state="done", input_moved_to=committed)
        t.moved_to = self.mover.carry_out(action, job, t.rel, t.job.input_id)

    def _settle_error(self, t: Task) -> None:
        job, exc = t.job, t.error
        assert exc is not None
        action = after_run(job, exc, self.policy, self.store.clock())
        if isinstance(action, RetryAt):
            if self.store.retry_later(job.id, action.kind, action.error, action.at, owner=job.worker):
                seconds = round((action.at - self.store.clock()).total_seconds(), 1)
                self.log.warning(
                    "job.retry",
                    job=job.id,
                    file=t.name,
                    kind=exc.kind,
                    error=str(exc),
                    attempt=job.attempts,
                    in_seconds=seconds,
                )
                self.report(t, "retried")
                self.on_outcome(t, "retried")
            else:
                self.log.warning(
                    "job.lease_lost",
                    job=job.id,
                    file=t.name,
                    note="another node took this job over; its outcome is theirs",
                )
            return
        if not self.store.fail(job.id, exc.kind, str(exc), owner=job.worker, fields=t.work.fields if t.work else None):
            self.log.warning("job.lease_lost", job=job.id, file=t.name, kind=exc.kind)
            return
        failpoints.hit("on-fail")
        self.log.warning("job.failed", job=job.id, file=t.name, kind=exc.kind, error=str(exc))
        if self.mover is not None:
            t.moved_to = self.mover.carry_out(action, replace(job, state="failed"), t.rel, job.input_id)
        self.report(t, "failed")
        self._hook(t, "failed")
        self.on_outcome(t, "failed")

    def poisoned(self, job: Job) -> None:
        """A job the store failed as poison when it took it back (the service died while it was alone in flight,
        ``max_recoveries`` times): its input goes to failed/ beside its reason, and its failure hooks run."""
        error = PoisonJobError(job.error or "poison")
        task = Task(job=job, root=self.inbox or self.outbox, rel=job.rel, error=error)
        if self.mover is not None:
            action = after_run(job, error, self.policy, self.store.clock())
            task.moved_to = self.mover.carry_out(action, job, job.rel, job.input_id)
        self.log.error("job.failed", job=job.id, file=task.name, kind=error.kind, error=str(error))
        self.report(task, "failed")
        self._hook(task, "failed")
        self.on_outcome(task, "failed")

    # --- 6. measure ------------------------------------------------------------------------------------------------
    def brisque(self) -> Brisque | None:
        with self._brisque_lock:  # several threads may ask at once: load it once
            if self._brisque is False:
                entry = get_entry("brisque")
                try:
                    self._brisque = Brisque(
                        locate(self.settings.weights_dir, entry, 0), locate(self.settings.weights_dir, entry, 1)
                    )
                except (WeightsMissingError, WeightsCorruptError) as exc:
                    # Looked up again for the next job (a hash of 0.6 MB): fetching the files fixes it without a
                    # restart.
                    self.log.warning("brisque.unavailable", error=str(exc), fix=fetch_command("brisque"))
                    return None
            return self._brisque  # type: ignore[return-value]

    def metrics_due(self, limit: int) -> list[Job]:
        """Up to ``limit`` done jobs whose metrics are still to be recorded, oldest first: this node's, and those of
        nodes that are gone."""
        return self.store.metrics_pending(self.node, self.settings.stale_seconds, limit=limit)

    def measure(self, task: Task) -> None:
        """Compute the task's metrics on the pixels as written and record them (a later commit than ``done``); a
        task whose pixels were let go (the metrics fell behind a burst) is measured from its files instead.

        Never fails the job: a metric that cannot be computed is left out, and the log says why.
        """
        work = task.work
        t0 = time.perf_counter()
        if work is None or task.data is None:
            job = task.job if task.moved_to is None else replace(task.job, input_moved_to=task.moved_to)
            task.metrics = self.remeasure(job, self.mover.archive_root if self.mover else self.outbox)
        else:
            try:
                data = task.data
                task.metrics = pipeline.measure(
                    task.job.rule, work, task.fmt, self.brisque, lambda: self._written(data, work.size)
                )
            except Exception as exc:  # noqa: BLE001 - a metric must never take a finished job down
                work.notes.append(f"metrics failed: {type(exc).__name__}: {exc}")
                task.metrics = []
            self.store.record_metrics(task.job.id, task.metrics)
        seconds = time.perf_counter() - t0
        task.timer.times["metrics"] = seconds
        self.log.info(
            "job.measured",
            job=task.job.id,
            file=task.name,
            seconds=round(seconds, 3),
            notes=(work.notes if work is not None else None) or None,
            **{m.name: round(m.value, 4) for m in task.metrics},
        )
        if self.telemetry is not None:
            self.telemetry.stage_time(rule=task.job.folder, model=task.job.rule.model, stage="metrics", seconds=seconds)
        self._hook(task, "done")

    def report(self, t: Task, status: str) -> None:
        """The job's outcome, stage times and pixels, for the Prometheus metrics."""
        if self.telemetry is None:
            return
        times = {k: v for k, v in t.timer.times.items() if k in TELEMETRY_STAGES}
        times["queue"] = t.job.queue_seconds()
        times["total"] = sum(v for k, v in t.timer.times.items() if k != "queue")
        work = t.work
        self.telemetry.job_outcome(
            rule=t.job.folder,
            model=t.job.rule.model,
            status=status,
            stages=times,
            pixels_in=work.pixels_in if work and status == "done" else 0,
            pixels_out=work.pixels_out if work and status == "done" else 0,
        )

    def _written(self, data: bytes, size: tuple[int, int]) -> np.ndarray:
        """The pixels of an output file we wrote (a lossy one, to measure it as written), decoded in the sandbox."""
        return self.sandbox.decode_bytes(data, "the output", size[0] * size[1]).first.pixels

    def remeasure(self, job: Job, archive: Root) -> list[Metric]:
        """The metrics of a done job, computed from its output and its input files (archived, or still in the inbox
        when a crash came before the move too): for a job whose metrics fell behind a burst, or that a crash left
        unrecorded between the two commits. Both files are decoded in the sandbox. Records and returns them;
        ``lost`` when a file is gone."""
        s = self.settings
        try:
            out_rel = self.outbox.contains(Path(job.output_path or ""))
            if out_rel is None:
                raise FileNotFoundError(job.output_path)
            fd, st = self.outbox.open_file(out_rel)
            try:
                written, _ = self.sandbox.decode(fd, st.st_size, "the output", s.max_output_pixels, s.max_frames)
            finally:
                os.close(fd)
            work = pipeline.prepare(job.rule, self._input_decoded(job, archive), s)
            work.colour = pipeline.to_model(pipeline.colour_of(written.first.pixels))
            fmt = pipeline.output_format(job.rule, job.input_format)
            results = pipeline.measure(job.rule, work, fmt, self.brisque, lambda: written.first.pixels)
        except (OSError, UpscaledError) as exc:
            self.store.record_metrics(job.id, [], state="lost")
            self.log.warning(
                "metrics.lost",
                job=job.id,
                file=job.name,
                error=str(exc),
                note="the output or the input is gone; the job itself is done",
            )
            return []
        self.store.record_metrics(job.id, results)
        return results

    def _input_decoded(self, job: Job, archive: Root) -> imageio.Decoded:
        """A done job's input, wherever it is now (archived, or still in the inbox), decoded in the sandbox and
        checked against its sha256.

        Raises:
            FileNotFoundError: neither in the archive nor in the inbox (or not its content any more).
        """
        moved = archive.contains(Path(job.input_moved_to)) if job.input_moved_to else None
        s = self.settings
        for root, rel in ((archive, moved), (self.inbox, job.rel)):
            if root is None or rel is None:
                continue
            try:
                fd, st = root.open_file(rel)
            except (FileNotFoundError, UnsafePathError):
                continue
            try:
                decoded, sha = self.sandbox.decode(fd, st.st_size, job.name, s.max_pixels, s.max_frames)
            except InputChangedError:
                continue
            finally:
                os.close(fd)
            if sha == job.sha:
                return decoded
        raise FileNotFoundError(f"the input of {job.name} is neither in the archive nor in the inbox")

    def _log_done(self, t: Task) -> None:
        times = t.timer.times
        self.log.info(
            "job.done",
            job=t.job.id,
            file=t.name,
            model=t.job.rule.model,
            device=t.device or None,
            output=t.job.output_path,
            seconds=round(sum(times.values()), 3),
            queue_s=round(t.job.queue_seconds(), 3),
            moved_to=t.moved_to,
            notes=(t.work.notes if t.work else None) or None,
            metrics="to come" if t.job.rule.metric_names else None,
        )

    def _hook(self, t: Task, status: Literal["done", "failed"]) -> None:
        """Run the ``on_done`` / ``on_failed`` hooks of the job's rule and of the service, after the commit; they
        run on the hook runner's threads and never hold up the worker nor change the job's outcome."""
        if self.hooks is None:
            return
        rule, job = t.job.rule, t.job
        hooks = [*getattr(rule, f"on_{status}"), *getattr(self.settings, f"on_{status}")]
        if not hooks:
            return
        times = {f"t_{k}": round(v, 4) for k, v in t.timer.times.items()}
        self.hooks.submit(
            hooks,
            HookEvent(
                event=status,
                job_id=job.id,
                input=t.moved_to or job.input_path,
                output=job.output_path if status == "done" else None,
                model=rule.model,
                rule=job.folder,
                times=times,
                metrics={m.name: m.value for m in t.metrics},
                error=None if t.error is None else str(t.error),
                error_kind=None if t.error is None else t.error.kind,
            ),
        )

    # --- all of it, in the calling thread --------------------------------------------------------------------------
    def run_task(self, task: Task, device: str, beat: Beat | None = None) -> None:
        """read -> infer -> write for one task, any error kept on the task for :meth:`settle`."""
        guard(task, lambda: self.read(task, self.beating(beat)), self.log)
        if task.error is None:
            guard(task, lambda: self.infer(task, device, beat), self.log)
        if task.error is None:
            guard(task, lambda: self.write(task), self.log)

    def step(
        self,
        worker: str,
        device: str,
        job_id: int | None = None,
        beat: Beat | None = None,
        root: Root | None = None,
    ) -> Task | None:
        """Claim one job and run it through every stage, here (``root``: a one-off job's folder). Returns its task,
        or None if there was none."""
        # One job through every stage in this thread: it is alone in flight (a job taken back after a crash may come).
        tasks = self.claim(worker, 1, job_id=job_id, root=root, alone=True)
        if not tasks:
            return None
        task = tasks[0]
        self.run_task(task, device, beat)
        for t in self.settle([task]):
            self.measure(t)
        task.close()
        return task


def guard(task: Task, fn: Callable[[], Any], log: Any) -> None:
    """Run one stage of ``task``; a failure is kept on the task (a bad file fails its own job, never a thread)."""
    try:
        fn()
    except UpscaledError as exc:
        task.error = exc
    except MemoryError:
        task.error = OutOfMemoryError("out of memory while processing")
    except Exception as exc:  # a bug or a library's surprise: this job fails, the service goes on
        log.error("job.crashed", job=task.job.id, file=task.name, error=repr(exc), traceback=traceback.format_exc())
        task.error = InternalError(f"unexpected {type(exc).__name__}: {exc}")


# --- the stages on threads ----------------------------------------------------------------------------------------
class Runner:
    """The stages on threads joined by bounded queues: a feeder (claim + read), ``workers`` inference threads per
    device, a writer (encode + write), a settler (commit + moves) and a measurer (metrics).

    At most ``depth`` tasks are in flight (claimed and not yet measured), and a new one is read only while the
    pixels in flight stay under ``memory_bytes`` (a single task larger than that still runs, alone).
    """

    def __init__(
        self,
        stages: Stages,
        devices: Iterable[str],
        workers: int,
        worker_id: Callable[[str], str],
        depth: int | None = None,
        memory_bytes: int = 2 << 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stages = stages
        self.clock = clock
        self.devices = list(devices)
        self.worker_id = worker_id
        self.workers_total = len(self.devices) * workers
        # In flight: two per worker (one in the model, one decoded and waiting) and the write and settle stages.
        self.depth = depth or 2 * self.workers_total + 2
        self.claim_batch = max(1, self.depth // 2)
        self.memory_bytes = memory_bytes
        self.log = logs.get()
        now = clock()
        self.beats: dict[str, Beat] = {
            "feed": Beat("feed", now),
            "write": Beat("write", now),
            "settle": Beat("settle", now),
            "measure": Beat("measure", now),
        }
        self._infer_q: dict[str, queue.Queue[Task]] = {d: queue.Queue(maxsize=workers) for d in self.devices}
        self._write_q: queue.Queue[Task] = queue.Queue(maxsize=2)
        self._settle_q: queue.Queue[Task] = queue.Queue()
        self._unsettled: list[Task] = []  # a batch whose commit failed, tried again first
        # Done jobs whose metrics are still to come. Only the newest `measure_buffer` keep their pixels; the older
        # ones let them go and are measured from their files: a burst never waits for its metrics, nor holds them.
        # At most `backlog_max` wait here. The next ones are *spilled*: their rows say the metrics are pending, and
        # the measurer reads them back from the store a page at a time once the backlog is empty. However far the
        # metrics trail (a steady stream, and a measurer at nice 10 under load), memory stays flat.
        self._backlog: deque[Task] = deque()
        self.measure_buffer = 2
        self.backlog_max = 64
        self.page = 64
        self._kept: set[int] = set()  # jobs given a place in the backlog, from before their done commit
        self._spilled = False  # the store may hold pending metrics that no task here stands for
        self._spill_seq = 0  # bumped as each done commit that spilled ends
        self._spilling_commits = 0  # done commits under way that spilled a job
        self._page: deque[Job] = deque()  # spilled jobs read back from the store, next to be measured
        self._inflight: set[int] = set()
        self._tasks: dict[int, Task] = {}
        self._solo: int | None = None  # the job running alone in flight (taken back after a worker died)
        self._next_suspect_check = 0.0  # when to look for such jobs again (0: at the next claim)
        self._bytes = 0
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stop_claiming = threading.Event()
        self._give_up = threading.Event()
        self._threads: list[threading.Thread] = []
        self._niced = False
        self.infer_names = [f"{d.replace(':', '')}.{i}" for d in self.devices for i in range(workers)]
        for name in self.infer_names:
            self.beats[name] = Beat(name, now)

    # --- control ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        specs: list[tuple[str, Callable[[], bool]]] = [
            ("feed", self._feed),
            ("write", self._write),
            ("settle", self._settle),
            ("measure", self._measure),
        ]
        for name, dev in zip(self.infer_names, [n.rsplit(".", 1)[0] for n in self.infer_names], strict=True):
            device = next(d for d in self.devices if d.replace(":", "") == dev)
            specs.append((name, functools.partial(self._infer, name, device)))
        for name, target in specs:
            t = threading.Thread(target=self._loop, args=(name, target), name=f"upscaled-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        """New jobs may be waiting: the feeder looks now instead of at its next poll."""
        self._wake.set()

    def busy(self) -> list[Task]:
        with self._cond:
            return [self._tasks[i] for i in sorted(self._inflight)]

    def stop(self, timeout: float) -> list[Task]:
        """Claim nothing more, let the tasks in flight finish for up to ``timeout`` seconds (then the metrics still
        to come, in what is left of it: the rest are measured at the next start); returns the tasks that did not
        finish (the caller releases them)."""
        self._stop_claiming.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._inflight or self._metrics_due()) and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            left = [self._tasks[i] for i in sorted(self._inflight)]
        self._give_up.set()  # the metrics not begun yet are measured at the next start
        # Each thread returns once it is idle; the metrics thread may still be inside the last job's metric. A
        # thread left inside native code when the interpreter shuts down is killed there by pthread_exit, which
        # aborts the process in C++ code (OpenCV): wait for them, and say which did not end (see `running`).
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return left

    def running(self) -> list[str]:
        """The names of the threads that have not ended (after :meth:`stop`: those still inside a call)."""
        return [t.name for t in self._threads if t.is_alive()]

    # --- threads ---------------------------------------------------------------------------------------------------
    def _loop(self, name: str, body: Callable[[], bool]) -> None:
        name_native_thread(f"upscaled-{name}")
        beat = self.beats[name]
        while True:
            beat.at = self.clock()
            try:
                if body() is False:
                    return
                beat.passed(self.clock())
            except Exception as exc:  # a store error (say, the disk is full): back off, never die
                beat.failed(self.clock(), exc)  # but a thread whose every pass fails is stuck (/livez, WATCHDOG=1)
                self.log.error("worker.error", thread=name, error=repr(exc), traceback=traceback.format_exc())
                time.sleep(1.0)

    def _done(self, task: Task, keep_pixels: bool = False) -> None:
        """The task leaves the pipeline (its slot and its bytes are free); its pixels go too, unless its metrics
        are still to be measured from them."""
        task.close()
        if not keep_pixels:
            task.work, task.data = None, None
        with self._cond:
            self._inflight.discard(task.job.id)
            self._tasks.pop(task.job.id, None)
            self._bytes -= task.weight
            if self._solo == task.job.id:
                self._solo = None
            self._cond.notify_all()

    def suspects_maybe(self) -> None:
        """Jobs may have been taken back after a worker died: look for them before the next claim."""
        self._next_suspect_check = 0.0
        self._wake.set()

    def _claim_alone(self) -> list[Task] | None:
        """After an unclean stop, the jobs taken back run one at a time, each alone in flight, so that a file that
        kills the service is the one blamed (``max_recoveries`` deaths alone make it poison), never a job that was
        merely in flight beside it. Returns the claimed task (a list of one), [] to wait, None when there are no
        such jobs (the pipeline overlaps again)."""
        with self._cond:
            if self._solo is not None:
                return []  # one runs alone now: nothing beside it
            now = self.clock()
            if now < self._next_suspect_check:
                return None
        s = self.stages
        count = s.store.suspects(s.settings.serve_folders if s.node else None, "watch" if s.mover else None)
        with self._cond:
            if not count:
                self._next_suspect_check = now + SUSPECT_CHECK_SECONDS
                return None
            if self._inflight:  # the pipeline drains first
                self._cond.wait(0.2)
                return []
        tasks = s.claim(self.worker_id("feed"), limit=1, alone=True)
        if tasks:
            self.log.warning(
                "job.alone",
                job=tasks[0].job.id,
                file=tasks[0].name,
                recoveries=tasks[0].job.recoveries,
                note="taken back after a worker died: it runs alone in flight",
            )
            with self._cond:
                self._solo = tasks[0].job.id
        return tasks

    def _feed(self) -> bool:
        beat = self.beats["feed"]
        if self._stop_claiming.is_set():
            return False
        alone = self._claim_alone()
        if alone is not None and not alone:
            self._wake.wait(0.2)
            self._wake.clear()
            return True
        with self._cond:
            free = self.depth - len(self._inflight)
            full = free <= 0 or (self._inflight and self._bytes >= self.memory_bytes)
            # Claim in batches (one commit for several jobs) while the workers still have work queued; claim
            # whatever is free as soon as they might run dry.
            starving = len(self._inflight) <= self.workers_total
            full = full or (free < self.claim_batch and not starving)
        if full and alone is None:
            with self._cond:
                self._cond.wait(0.5)
            return True
        tasks = alone if alone is not None else self.stages.claim(self.worker_id("feed"), limit=free)
        if not tasks:
            self._wake.wait(0.5)
            self._wake.clear()
            return True
        with self._cond:
            for t in tasks:
                self._inflight.add(t.job.id)
                self._tasks[t.job.id] = t
        for t in tasks:
            beat.start(t, "decode", self.clock(), t.pixels_in())
            guard(t, functools.partial(self.stages.read, t, self.stages.beating(beat)), self.log)
            beat.end(self.clock())
            if t.error is not None:
                self._settle_q.put(t)
                continue
            with self._cond:  # the pixels are counted from now on; wait while memory is full (unless alone)
                self._bytes += t.weight
            self._route(t).put(t)
        return True

    def _route(self, t: Task) -> queue.Queue[Task]:
        """The inference queue of the task's device: the rule's own device if this node runs it, else the
        emptiest one."""
        want = t.job.rule.device
        if want in self._infer_q:
            return self._infer_q[want]
        return min(self._infer_q.values(), key=lambda q: q.qsize())

    def _infer(self, name: str, device: str) -> bool:
        beat = self.beats[name]
        try:
            t = self._infer_q[device].get(timeout=0.5)
        except queue.Empty:
            return not (self._stop_claiming.is_set() and not self._inflight)
        beat.start(t, "infer", self.clock(), t.pixels_out())  # the tiles beat; the final resize may not
        guard(t, lambda: self.stages.infer(t, device, beat), self.log)
        beat.end(self.clock())
        (self._settle_q if t.error is not None else self._write_q).put(t)
        return True

    def _write(self) -> bool:
        beat = self.beats["write"]
        try:
            t = self._write_q.get(timeout=0.5)
        except queue.Empty:
            return not (self._stop_claiming.is_set() and not self._inflight)
        beat.start(t, "write", self.clock(), t.pixels_out())
        guard(t, lambda: self.stages.write(t), self.log)
        beat.end(self.clock())
        self._settle_q.put(t)
        return True

    def _settle(self) -> bool:
        beat = self.beats["settle"]
        batch, self._unsettled = self._unsettled, []
        if not batch:
            try:
                batch.append(self._settle_q.get(timeout=0.5))
            except queue.Empty:
                return not (self._stop_claiming.is_set() and not self._inflight)
        while True:  # everything that is ready: one commit for all (a group commit while the queue is deep)
            try:
                batch.append(self._settle_q.get_nowait())
            except queue.Empty:
                break
        # A fresh sign of life as the commit starts: the wait for the batch is not silence, the commit's own time is.
        beat.at, beat.busy, beat.stage = self.clock(), True, "settle"
        kept, spilled = self._reserve(batch)
        try:
            measure = self.stages.settle(batch)
        except BaseException:
            # The database refused the commit (a timeout, a deadlock, a full disk): the outputs are written and the
            # jobs still ours; the batch is tried again on the next pass (the loop logs this one and backs off),
            # never dropped to leave its jobs running and its slots taken. Its places in the backlog are given
            # back, and its metrics come from the store (some may have been committed before it failed).
            self._unsettled = batch
            with self._cond:
                self._spilled = True
            self._hold([], kept, spilled)
            raise
        finally:
            beat.busy, beat.stage = False, ""
        keep = [t for t in measure if t.job.id in kept]
        ids = {t.job.id for t in keep}
        for t in batch:
            self._done(t, keep_pixels=t.job.id in ids)
        self._hold(keep, kept, spilled)
        return True

    def _reserve(self, batch: list[Task]) -> tuple[set[int], bool]:
        """Before the done commit, decide for each task whose metrics will be due whether the backlog holds it or
        it is spilled to the store. Returns the ids kept and whether any was spilled.

        Deciding before the commit is what keeps each job measured once: a page read from the store can only hold
        a job committed before it was read, and so decided before it; the kept ones are left out of every page,
        and while jobs are spilled none is kept."""
        due = [t.job.id for t in batch if t.error is None and t.job.rule.metric_names]
        with self._cond:
            room = 0 if self._spilled else max(0, self.backlog_max - len(self._kept))
            kept = set(due[:room])
            spilled = len(due) > room
            if spilled:
                self._spilled = True
                self._spilling_commits += 1
            self._kept |= kept
        return kept, spilled

    def _hold(self, keep: list[Task], kept: set[int], spilled: bool) -> None:
        """After the done commit: ``keep`` joins the backlog; the other ids of ``kept`` (a lease lost, a commit that
        failed) give their places back; the spilling commit, if it was one, has ended."""
        with self._cond:
            self._kept -= kept - {t.job.id for t in keep}
            self._backlog.extend(keep)
            if spilled:
                self._spilling_commits -= 1
                self._spill_seq += 1
            holding = [t for t in self._backlog if t.work is not None]
            for t in holding[: max(0, len(holding) - self.measure_buffer)]:
                t.work, t.data = None, None
            self._cond.notify_all()

    def _measure(self) -> bool:
        """Metrics at a low CPU priority (nice 10): the jobs in flight come first, the metrics catch up."""
        beat = self.beats["measure"]
        if not self._niced:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            except OSError:
                pass  # not allowed here: the metrics simply compete at the same priority
            self._niced = True
        with self._cond:
            if not self._backlog and not self._page:
                self._cond.wait(0.05 if self._spilled else 0.5)
        if self._give_up.is_set():
            return False
        if not self.measure_one(beat):
            return not (self._stop_claiming.is_set() and not self._inflight and not self._metrics_due())
        return True

    def measure_one(self, beat: Beat | None = None) -> bool:
        """Measure the oldest job of the backlog, or else the next spilled one, here. Returns whether there was
        one."""
        with self._cond:
            t = self._backlog.popleft() if self._backlog else None
        if t is None:
            t = self._next_spilled()
        if t is None:
            return False
        if beat is not None:
            beat.start(t, "metrics", self.clock(), 2 * t.pixels_out())  # from the files: decodes both too
        try:
            self.stages.measure(t)
        except BaseException:
            with self._cond:  # its row still says pending: the next read of the store brings it back
                self._spilled = True
            raise
        finally:
            if beat is not None:
                beat.end(self.clock())
            t.work, t.data = None, None
            with self._cond:
                self._kept.discard(t.job.id)  # only now: its metrics are committed, no page can bring it back
                self._cond.notify_all()
        return True

    def _next_spilled(self) -> Task | None:
        """The next spilled job, read back from the store a page at a time (the kept ones left out); None when the
        store holds none. The store is read only while the backlog is empty and jobs are spilled, so that nothing
        is kept meanwhile."""
        if not self._page:
            with self._cond:
                if not self._spilled or self._backlog:
                    return None
                seq, kept = self._spill_seq, set(self._kept)
            rows = self.stages.metrics_due(len(kept) + self.page)
            page = [j for j in rows if j.id not in kept]
            with self._cond:
                # None left, and no spilling commit ended or is under way since the read: nothing is spilled.
                if not rows and seq == self._spill_seq and not self._spilling_commits:
                    self._spilled = False
                self._page.extend(page)
                if not self._page:
                    return None
        task = self.stages.task(self._page.popleft())
        task.moved_to = task.job.input_moved_to  # where its input went: what its done hook says
        return task

    def _metrics_due(self) -> bool:
        """Whether done jobs wait for their metrics: in the backlog, or spilled to the store."""
        return bool(self._backlog or self._page or self._spilled)

    def backlog(self) -> int:
        """Done jobs whose metrics are still to come and that this process holds (spilled ones not counted)."""
        with self._cond:
            return len(self._backlog) + len(self._page)

    def queue_metrics(self) -> None:
        """The store may hold done jobs whose metrics were never recorded (a crash or a stop came between the two
        commits): they are measured from their files, a page at a time, behind the live work."""
        with self._cond:
            self._spilled = True
            self._cond.notify_all()


def name_native_thread(name: str) -> None:
    """The kernel's name for the calling thread (15 bytes): what `top -H`, `ps -L` and py-spy show."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass  # not Linux, or no prctl: the threads keep the process's name


def describe(task: Task, stage: str) -> str:
    """``photos/a.png (fsrcnn x4, infer)``: a task for STATUS= and the logs, printable whatever its name holds."""
    rule = task.job.rule
    return f"{display(task.name)} ({rule.model} x{rule.final_scale:g}, {stage})"
