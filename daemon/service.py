"""The service: wires the parts together and runs them until SIGTERM.

    watcher ──► intake ──► store ◄── runner (claim ─► read ─► infer ─► write ─► settle ─► measure)
       (main thread)          ▲            (threads; daemon/worker.py)      │
                              └── cluster (heartbeat thread)     dispositions: the moves, after each commit

- the main thread watches the inbox, admits files that are complete (:mod:`daemon.intake`), reconciles a file
  whose job exists (:func:`daemon.dispositions.for_existing`), talks to systemd and handles signals (the handlers
  only set flags);
- the :class:`~daemon.worker.Runner` works the queue on its threads;
- the :class:`~daemon.cluster.Cluster` heartbeats and takes over dead nodes' jobs.

Tests drive it with ``start() / step(wait) / shutdown()``, one iteration at a time in one thread (``step`` runs at
most one job through every stage, in the calling thread); ``run()`` is what ``upscaled run`` calls.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from daemon import __version__, failpoints, logs
from daemon.cluster import Cluster, worker_may_live
from daemon.config import LiveSettings, Settings, UsesSettings, load_settings
from daemon.dispositions import Archive, LeaveToOwner, Mover, Policy, Requeue, Wait, for_existing
from daemon.errors import ConfigError
from daemon.fsops import FileId, Root, display
from daemon.hints import Hints
from daemon.hooks import HookRunner
from daemon.intake import Intake
from daemon.jobs import DaemonStore, Job, JobSpec, worker_id
from daemon.notify import Notifier
from daemon.rules import implicit_default, make_rule_folders
from daemon.sandbox import Sandbox
from daemon.store import SqlStore, safe_url
from daemon.telemetry import HttpServer, Telemetry
from daemon.watcher import Watcher
from daemon.worker import Beat, Runner, Stages, Task, describe
from models import devices, runtime
from models.catalog import get_entry
from models.errors import UpscaledError
from models.registry import ModelCache
from models.weights import needs_weights, present

# Settings a SIGHUP cannot change: they shape the running parts.
RESTART_KEYS = (
    "sandbox_processes",
    "decode_memory_limit",
    "inbox",
    "outbox",
    "archive",
    "failed",
    "database",
    "observer",
    "node_name",
    "device",
    "workers",
    "http_listen",
    "http_allowed_hosts",
)


# /readyz: the main loop's passes that may fail in a row before intake counts as stuck. One is a hiccup (a database
# busy for a moment); three, a second apart (the loop's back-off), are a fault that will not clear by itself.
FAILED_PASSES = 3
# /readyz: the database takes no writes when this node's heartbeat has not been written for this many periods.
HEARTBEAT_PERIODS = 3


def _folder_problem(root: Root, read: bool = False) -> str | None:
    """Why the service cannot use the folder it holds as ``root``, or None: the path is missing, is not the folder
    opened at start (moved away, replaced or mounted over: the service would go on working in the old one), or it
    cannot be written (nor listed, with ``read``)."""
    path = root.path
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if FileId.of(st) != FileId.of(os.fstat(root.fd)):
        return f"{path} is not the folder the service opened at start (moved, replaced or mounted over); restart it"
    mode = os.W_OK | os.X_OK | (os.R_OK if read else 0)
    if not os.access(path, mode):
        return f"{path} is not {'readable and ' if read else ''}writable"
    return None


def check_devices(settings: Settings) -> list[str]:
    """The GPUs this node is told to use (``device``, and the ``device`` of each rule it serves), checked.

    Raises:
        ConfigError: a GPU that PyTorch does not see. A worker on it would fail every job it claimed, jobs that a
            worker on another device could have done, so the node refuses to start instead.
    """
    served = [r for r in settings.all_rules() if settings.serve_folders is None or r.folder in settings.serve_folders]
    try:
        return devices.check([*settings.devices(), *(r.device for r in served if r.device)])
    except UpscaledError as exc:
        raise ConfigError(f"device: {exc}") from None


class Service(UsesSettings):
    """The watch-folder service. See the module docstring.

    ``store`` is any :class:`~daemon.jobs.DaemonStore` (default: the SQL store of ``settings.database``; the unit
    tests pass a :class:`~daemon.jobs.MemoryStore`), ``clock`` the monotonic clock of the watch loop and the beats.
    """

    def __init__(
        self,
        settings: Settings,
        store: DaemonStore | None = None,
        cache: ModelCache | None = None,
        clock: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        settings = settings.resolve_devices()  # "auto" named once, as the real device, everywhere
        self.live = LiveSettings(settings)
        s = settings
        os.umask(int(s.umask, 8))  # before the database file and the folders are created
        self.clock = clock
        self.log = logs.get()
        self.store: DaemonStore = store or SqlStore(s.database)
        self.node = s.node()
        self.notifier = notifier or Notifier()
        self.inbox, self.outbox = Root(s.inbox), Root(s.outbox)
        self.archive, self.failed = Root(s.archive), Root(s.failed)
        self.mover = Mover(self.store, self.inbox, self.archive, self.failed)
        # Every byte someone else wrote is parsed in these processes (a test shares one pool among services).
        self.own_sandbox = sandbox is None
        self.sandbox = sandbox or Sandbox.for_settings(s)
        self.intake = Intake(self.live, self.inbox, self.sandbox, beat=self._main_beat)
        self.telemetry = Telemetry(
            self.node, __version__, devices.build_info(), memory=devices.memory_used, health=self
        )
        self.http = HttpServer(s.http_listen, self.telemetry, self, s.http_allowed_hosts) if s.http_listen else None
        self.hooks = HookRunner(self.store.record_hook)
        self.stages = Stages(
            self.live,
            self.store,
            cache or ModelCache(),
            self.inbox,
            self.outbox,
            self.mover,
            node=self.node,
            on_outcome=self._on_outcome,
            clock=clock,
            telemetry=self.telemetry,
            hooks=self.hooks,
            sandbox=self.sandbox,
        )
        workers, cpu_workers = s.worker_count(), s.cpu_workers()
        if cpu_workers:
            runtime.share_cpus(cpu_workers)
        self.runner = Runner(self.stages, s.devices(), workers, lambda _name: worker_id(), clock=clock)
        self.cluster = Cluster(self.live, self.store, workers * len(s.devices()), on_recovered=self._on_recovered)
        self.watcher = Watcher(
            s.inbox, s.ignore, s.settle_seconds, polling=s.observer == "polling", poll_seconds=s.poll_seconds
        )
        self.main = Beat("main", clock())
        self._heartbeat_started = False  # the cluster's heartbeat thread runs (in run(); not when stepped)
        self.stop_signal: int | None = None  # the signal that asked for the stop (0: a call); None: running
        self._reload = False
        self._next_rescan = 0.0
        self._next_status = 0.0
        self._reload_problem: str | None = None
        self._lock = threading.Lock()
        self._waiting: dict[int, list[PurePosixPath]] = defaultdict(list)  # duplicates waiting for a job to end
        # Inbox files whose job runs elsewhere (another node, or a job queued before a restart): looked at again when
        # the store says the job ended, so an input that node could not move (it died) is finished here.
        self._watching: dict[PurePosixPath, int] = {}
        self._again: queue.SimpleQueue[PurePosixPath] = queue.SimpleQueue()  # re-admitted by the main thread

    def _main_beat(self) -> None:
        """A sign of life from the main thread while it is busy inside one file (hashing it, waiting for the sandbox
        to read its header): the watchdog's pings go on from here too, not only between passes of the loop."""
        self.main.at = self.clock()
        self._tell_systemd()  # rate-limited: at most every interval / 3

    # --- life cycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        check_devices(s)
        self.sandbox.start()  # its processes start in the background while the rest comes up
        self.cluster.join()
        # Before this node claims anything: its own previous life's jobs, unowned ones, and dead nodes' jobs.
        recovered = len(self.cluster.recover(at_start=True))
        # Other live nodes may be writing into a shared outbox right now: leave their young temp files alone.
        older = s.stale_seconds if self.cluster.others() else 0.0
        stale = sum(root.remove_stale_temps(older) for root in (self.outbox, self.archive, self.failed))
        self._rule_folders()
        self.watcher.start()
        self.watcher.rescan()
        self._next_rescan = self.clock() + s.rescan_seconds
        self._warn()
        self.telemetry.declare([(r.folder, r.model) for r in s.all_rules()], s.devices())
        if self.http is not None:
            self.http.start()
        self.remeasure()
        self.log.info(
            "service.started",
            inbox=str(s.inbox),
            outbox=str(s.outbox),
            database=safe_url(s.database),
            rules=len(s.all_rules()),
            observer=s.observer,
            recovered_jobs=recovered,
            node=self.node,
            stale_temp_files=stale,
            pid=os.getpid(),
            systemd_notify=self.notifier.enabled,
            version=__version__,
        )

    def _rule_folders(self) -> None:
        """Every rule's inbox folder, made where missing (at start and on reload; see :func:`make_rule_folders`)."""
        made, problems = make_rule_folders(self.settings, self.inbox)
        if made:
            self.log.info("rule_folders.created", folders=[display(str(f)) for f in made])
        for folder, problem in problems.items():
            self.log.warning("rule_folder.unusable", folder=display(folder), error=problem)

    def _warn(self) -> None:
        """Start-up (and reload) warnings: the default rule when the file has none, rules whose weights are missing,
        and what each backend has to say."""
        implicit = implicit_default(self.settings)
        if implicit is not None:
            self.log.warning(
                "rule.implicit_default",
                model=implicit.model,
                scale=implicit.final_scale,
                note='no rule has folder = "": files outside the rule folders get this built-in rule; '
                'add a [[rules]] with folder = "" to choose what they get',
            )
        hints = Hints.of(self.settings)
        for rule in self.settings.all_rules():
            entry = get_entry(rule.model)
            if needs_weights(entry) and not present(self.settings.weights_dir, entry):
                self.log.warning(
                    "weights.missing",
                    model=rule.model,
                    folder=rule.folder or "(default)",
                    fix=hints.fetch([rule.model]),
                )
            backend = rule.backend()
            problem = backend.available()
            if problem:
                self.log.warning(
                    "backend.unavailable", model=rule.model, folder=rule.folder or "(default)", error=problem
                )
            for device in [rule.device] if rule.device else self.settings.devices():
                for text in backend.warnings(entry, rule.model_params(), device):
                    self.log.warning("rule.warning", model=rule.model, folder=rule.folder or "(default)", note=text)

    def remeasure(self) -> None:
        """Metrics a crash left unrecorded (between the ``done`` commit and the metrics commit): measured behind the
        live work, read from the store a page at a time, from the output and the archived input (``lost`` where
        the input was deleted)."""
        self.runner.queue_metrics()

    def shutdown(self) -> None:
        self.watcher.stop()
        self.hooks.close(timeout=5.0)  # what is queued gets a few seconds; the rest is recorded as not run
        if self.http is not None:
            self.http.close()
        self.cluster.leave()
        counts = self.store.counts()
        self.store.close()
        self.notifier.close()
        if self.own_sandbox:
            self.sandbox.close()
        for root in (self.inbox, self.outbox, self.archive, self.failed):
            root.close()
        self.log.info("service.stopped", **counts)

    # The signal handlers only set flags; the main loop acts on them within its 0.25 s pass. A handler runs on the
    # main thread between two of its bytecodes, which may be inside a log call holding the log's lock (or a
    # queue's or an event's): a handler that logged, or set an event, would wait for that lock forever. (A daemon
    # SIGTERMed while it logged did exactly that, and ignored every later SIGTERM.)
    def request_stop(self, signum: int | None = None, _frame: object = None) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum or 0

    @property
    def stopping(self) -> bool:
        return self.stop_signal is not None

    def request_reload(self, _signum: int | None = None, _frame: object = None) -> None:
        self._reload = True

    def run(self) -> int:
        """The service, until SIGTERM or SIGINT. Returns the exit code (0 for a requested stop)."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        self.start()
        self.runner.start()
        self.cluster.start(self.clock)
        self.notifier.ready(self.status_line())
        self._heartbeat_started = True
        while not self.stopping:
            try:
                self.watch_step(wait=0.25)
                if self._reload:
                    self._reload = False
                    self.reload()
                self.main.passed(self.clock())
            except Exception as exc:  # the watcher side must never take the service down
                # ... but a loop that raises on every pass is stuck: /livez and the watchdog see it (Beat.failed).
                self.main.failed(self.clock(), exc)
                self.log.error(
                    "loop.error", error=repr(exc), failures=self.main.failures, traceback=traceback.format_exc()
                )
                time.sleep(1.0)
            self._tell_systemd()
        self.log.info("service.stopping", signal=signal.Signals(self.stop_signal).name if self.stop_signal else None)
        # 1. Stop taking files. 2. Let the jobs in flight finish until the deadline. 3. Give back those that did not.
        self.watcher.stop()
        busy = [t.name for t in self.runner.busy()]
        self.notifier.stopping(f"stopping; finishing {', '.join(busy)}" if busy else "stopping")
        left = self.runner.stop(self.settings.stop_timeout)
        if left or self.runner.running():
            released = [t.job.id for t in left if self.store.release(t.job.id, owner=t.job.worker)]
            self.log.warning(
                "service.stop_deadline",
                seconds=self.settings.stop_timeout,
                released_jobs=released,
                threads=self.runner.running(),
            )
            self.shutdown()
            sys.stdout.flush()
            os._exit(0)  # a thread is inside native code and cannot be interrupted; its job is pending again
        self.shutdown()
        return 0

    def reload(self) -> None:
        """SIGHUP: read the configuration again and use its rules for files admitted from now on.

        Queued jobs keep the rule they were registered with. A bad file is logged and the old settings stay.
        """
        try:
            new = load_settings(self.settings.config_file).resolve_devices()
        except UpscaledError as exc:
            self.log.error("reload.failed", error=str(exc))
            self._reload_problem = f"the last reload failed (the old settings stay): {exc}"
            return
        self._reload_problem = None
        changed = [k for k in RESTART_KEYS if getattr(new, k) != getattr(self.settings, k)]
        if changed:
            self.log.warning("reload.needs_restart", keys=changed)
            new = new.model_copy(update={k: getattr(self.settings, k) for k in RESTART_KEYS})
        self.live.settings = new  # the stages, the intake and the cluster read it from here
        self.sandbox.timeout = new.decode_timeout
        self.watcher.patterns = new.ignore
        self.watcher.settle = new.settle_seconds
        self._rule_folders()
        self._warn()
        self.telemetry.declare([(r.folder, r.model) for r in new.all_rules()], new.devices())
        self.log.info("reload.done", rules=len(new.all_rules()))

    # --- systemd ---------------------------------------------------------------------------------------------------
    def status_line(self) -> str:
        c = self.store.counts()
        busy = [(b.task, b.stage) for b in self.runner.beats.values() if b.busy and b.task is not None]
        doing = "working on " + ", ".join(describe(t, stage) for t, stage in busy) if busy else "idle"
        return f"{doing}; queue {c['pending']}; done {c['done']}, failed {c['failed']}"

    def stuck(self, limit: float) -> dict[str, str]:
        """The threads, the main loop among them, that have made no progress for ``limit`` seconds, each with why:
        silent (inside a call that does not return) or failing (every pass of its loop has raised since then).

        The one test behind both the watchdog pings and /livez, so that the two never disagree."""
        now = self.clock()
        out: dict[str, str] = {}
        for b in [self.main, *self.runner.beats.values()]:
            age = b.silent_for(now)
            if age < limit:
                continue
            if b.failing_since is not None:
                out[b.name] = f"every pass of its loop has failed for {age:.0f} s ({b.failures} in a row): {b.error}"
            else:
                out[b.name] = f"no sign of life for {age:.0f} s{f' (on {describe(b.task, b.stage)})' if b.task else ''}"
        return out

    def live_limit(self) -> float:
        """Seconds without progress after which a thread is stuck for /livez: ``hung_seconds``, or half the systemd
        watchdog's interval when that is shorter, since the pings stop then (and systemd restarts the service)."""
        wd = self.notifier.watchdog_seconds
        return min(self.settings.hung_seconds, wd / 2) if wd else self.settings.hung_seconds

    def _tell_systemd(self) -> None:
        """STATUS= every 2 s at most, and WATCHDOG=1 with it unless a thread is stuck. Never raises: a database
        that does not answer costs the status line its counts, not the ping its decision."""
        now = self.clock()
        if not self.notifier.enabled or now < self._next_status:
            return
        interval = self.notifier.watchdog_seconds or 10.0
        self._next_status = now + min(2.0, interval / 3)
        try:
            line = self.status_line()
        except Exception as exc:  # noqa: BLE001 - the counts come from the database
            line = f"status unavailable: {type(exc).__name__}"
        if self.main.failures:
            line += f"; the main loop is failing ({self.main.failures} in a row): {self.main.error}"
        self.notifier.status(line)
        # A stuck thread, any one of them, stops the pings, and systemd restarts the service after WatchdogSec.
        if self.notifier.watchdog_seconds and not self.stuck(self.notifier.watchdog_seconds / 2):
            self.notifier.watchdog()

    # --- health: /livez and /readyz (daemon/telemetry.py) -------------------------------------------------------------
    def liveness(self) -> dict[str, str | None]:
        """The main loop and every worker thread: alive unless :meth:`stuck` for :meth:`live_limit` seconds (a busy
        thread beats at each stage, tile and denoising step; an idle one twice a second; a pass that raises does
        not count)."""
        stuck = self.stuck(self.live_limit())
        return {f"thread {b.name}": stuck.get(b.name) for b in [self.main, *self.runner.beats.values()]}

    def readiness(self) -> dict[str, str | None]:
        """Can this node do its work: configuration, database (it answers, and takes writes), folders (there, the ones
        opened at start, usable), intake (the watcher runs, the main loop's passes succeed), weights of the rules it
        serves, devices."""
        s = self.settings
        checks: dict[str, str | None] = {"config": self._reload_problem}
        try:
            self.store.counts()
            checks["database"] = self._heartbeat_problem()
        except Exception as exc:  # noqa: BLE001 - any database error is the answer
            checks["database"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        for key, root in (
            ("inbox", self.inbox),
            ("outbox", self.outbox),
            ("archive", self.archive),
            ("failed", self.failed),
        ):
            checks[key] = _folder_problem(root, read=key == "inbox")
        checks["watcher"] = (
            None
            if self.watcher.running
            else f"the inbox watcher has stopped: new files are seen only by the rescan every {s.rescan_seconds:g} s; "
            "restart the service"
        )
        m = self.main
        checks["intake"] = (
            None
            if m.failures < FAILED_PASSES or m.failing_since is None
            else f"the main loop has failed its last {m.failures} passes, for "
            f"{self.clock() - m.failing_since:.0f} s: {m.error}"
        )
        missing = [
            r.model
            for r in self._served()
            if needs_weights(get_entry(r.model)) and not present(s.weights_dir, get_entry(r.model))
        ]
        checks["weights"] = (
            None if not missing else f"missing for {', '.join(dict.fromkeys(missing))} ({Hints.of(s).fetch(missing)})"
        )
        try:
            check_devices(s)
            checks["devices"] = None
        except ConfigError as exc:
            checks["devices"] = str(exc)
        checks["sandbox"] = self.sandbox.problem()  # no process can parse inputs: nothing can be admitted
        return checks

    def _heartbeat_problem(self) -> str | None:
        """Why the database is not taking this node's writes, judged by its heartbeat (a write every
        ``heartbeat_seconds``, from its own thread once the service runs), or None."""
        if not self._heartbeat_started:
            return None
        every = self.settings.heartbeat_seconds
        age = self.clock() - self.cluster.last_beat
        if age <= HEARTBEAT_PERIODS * every:
            return None
        return (
            f"the database takes no writes: this node's heartbeat (every {every:g} s) has not been written for "
            f"{age:.0f} s; see heartbeat.error in the log"
        )

    def queue(self) -> dict[str, int]:
        """``running``: this node's jobs; ``pending``: the jobs waiting (the same on every node: take the max)."""
        c = self.store.counts(node=self.node)
        return {"pending": c["pending"], "running": c["running"]}

    def _served(self) -> list:
        s = self.settings
        return [r for r in s.all_rules() if s.serve_folders is None or r.folder in s.serve_folders]

    # --- one iteration ---------------------------------------------------------------------------------------------
    def step(self, wait: float = 0.0) -> bool:
        """One iteration in the calling thread: take in events, admit ready files, run at most one job through every
        stage. Returns whether a job ran."""
        self.watch_step(wait)
        if self.stopping:
            return False
        ran = self.stages.step(worker_id(), self.settings.devices()[0], beat=self.main) is not None
        return self.runner.measure_one() or ran  # metrics left by a crash, measured here when stepping

    def watch_step(self, wait: float = 0.0) -> None:
        """Take in watcher events (waiting up to ``wait``), rescan when due, and admit the files that settled."""
        deadline = self.watcher.next_deadline(self.clock())
        self.watcher.drain(timeout=min(wait, deadline) if deadline is not None else wait)
        now = self.main.at = self.clock()
        if now >= self._next_rescan:
            found = self.watcher.rescan()
            if found:
                self.log.info("rescan.found", files=found)
            self._next_rescan = now + self.settings.rescan_seconds
            self._look_again()
        ready = [p for p in (self._rel(p) for p in self.watcher.ready(now)) if p is not None]
        while True:
            try:
                ready.append(self._again.get_nowait())
            except queue.Empty:
                break
        if ready:
            self.admit(ready)

    def _rel(self, path: Path) -> PurePosixPath | None:
        return self.inbox.contains(path)

    # --- admitting files -------------------------------------------------------------------------------------------
    def admit(self, rels: list[PurePosixPath]) -> None:
        """Register complete files as jobs, or reconcile each with the job that exists. A burst is registered in
        commits of 4, 8, 16, ... up to 64 files: the workers start on the first files while the rest are hashed,
        and a thousand files still cost a few dozen commits.

        Raises:
            Exception: whatever a commit raised (the database refused it); the files not registered yet are given
                back to the watcher first, so they are taken again.
        """
        specs: list[JobSpec] = []
        chunk, first = 4, 0  # rels[first:] are not registered yet
        try:
            for i, rel in enumerate(rels):
                try:
                    spec = self.intake.spec(rel)
                except Exception as exc:  # a bug must fail one file, never the loop
                    self.log.error(
                        "intake.error", file=display(str(rel)), error=repr(exc), traceback=traceback.format_exc()
                    )
                    continue
                if spec is not None:
                    specs.append(spec)
                if len(specs) >= chunk:
                    self._register(specs)
                    specs, chunk, first = [], min(64, 2 * chunk), i + 1
            if specs:
                self._register(specs)
        except Exception:
            # The database refused the commit. The watcher handed these files over once and would not again until
            # they change: give them back, to be taken again once they settle, and let the loop count the failure.
            for rel in rels[first:]:
                self.watcher.note(self.inbox.abs(rel), True)
            raise

    def _register(self, specs: list[JobSpec]) -> None:
        """One commit for ``specs``; a file that failed at intake fails now, a known one is reconciled."""
        regs = self.store.register(specs, node=self.node)
        failpoints.hit("after-register")
        created = False
        for spec, reg in zip(specs, regs, strict=True):
            if reg.created and spec.failure is not None:
                self._fail_now(reg.job, spec)
            elif reg.created:
                created = True
                self.log.debug(
                    "job.registered", job=reg.job.id, file=reg.job.name, rule=reg.job.rule.folder or "(default)"
                )
            else:
                self._reconcile(reg.job, spec)
        if created:
            self.runner.wake()

    def _fail_now(self, job: Job, spec: JobSpec) -> None:
        """A file that failed at intake (a link, not an image, too large): its job was created running, owned by this
        process; fail it and quarantine it like any failed job."""
        failure = spec.failure
        assert isinstance(failure, UpscaledError)
        task = Task(job=job, root=self.inbox, rel=spec.rel, error=failure)
        self.stages.settle([task])

    def _reconcile(self, job: Job, spec: JobSpec) -> None:
        """A file whose content already has a job under its rule: finish an interrupted move, archive a duplicate,
        retry a failed one, or wait for the job (:func:`~daemon.dispositions.for_existing` decides, the mover
        carries it out); then the bookkeeping of the watch loop."""
        rel = spec.rel
        if not self.inbox.exists(rel):  # another node (or our worker) moved it while we hashed it
            return
        present = job.rel == rel or self.inbox.exists(job.rel)
        action = for_existing(
            job, rel, spec.input_id, Policy.of(self.settings), self.store.clock(), worker_may_live(job.worker), present
        )
        moved = self.mover.carry_out(action, job, rel, spec.input_id)
        if isinstance(action, Archive):
            same = job.rel == rel
            self.log.info(
                "job.input_archived" if same else "duplicate.archived",
                job=job.id,
                file=display(str(rel)),
                output=job.output_path,
                moved_to=moved,
            )
            if not same:
                self.telemetry.job_outcome(rule=job.folder, model=job.rule.model, status="duplicate")
        elif isinstance(action, Requeue):
            self.log.info("job.retry_requested", job=job.id, file=display(str(rel)))
            self.runner.wake()
        elif isinstance(action, LeaveToOwner):
            self.watcher.forget(self.inbox.abs(rel))  # its owner moves it in a moment; if it died, a rescan sees it
        elif isinstance(action, Wait):
            with self._lock:
                if job.rel != rel:  # same content, another name: decided when the job ends
                    self._waiting[job.id].append(rel)
                else:
                    self._watching[rel] = job.id

    def _look_again(self) -> None:
        """Files whose job ran elsewhere and has ended: admit them again (archive, quarantine or retry)."""
        with self._lock:
            watching = dict(self._watching)
        if not watching:
            return
        states = self.store.states(set(watching.values()))
        for rel, job_id in watching.items():
            if states.get(job_id) in ("done", "failed", None):
                with self._lock:
                    self._watching.pop(rel, None)
                self.watcher.finished(self.inbox.abs(rel))

    def _on_outcome(self, task: Task, status: str) -> None:
        """A job's outcome is committed (from a runner thread): let the watcher look at its file again later, and
        decide the duplicates that waited for it."""
        self.watcher.finished(self.inbox.abs(task.rel))
        with self._lock:
            self._watching.pop(task.rel, None)
            waiting = self._waiting.pop(task.job.id, [])
        for rel in waiting:
            self._again.put(rel)

    def _on_recovered(self, jobs: list[Job]) -> None:
        """Jobs taken back from a dead worker: remove the half-written output it may have left, quarantine the ones
        that became poison, and run the others, each alone in flight first (:meth:`Runner.suspects_maybe`).

        Its owner has been silent for ``stale_seconds``, so its temp files are at least half that old; a live writer's
        are younger (the job is claimed again only after this)."""
        for job in jobs:
            rel = self.outbox.contains(Path(job.output_path)) if job.output_path else None
            if rel is not None:
                self.outbox.remove_temps_of(rel, older_than=self.settings.stale_seconds / 2)
            if job.state == "failed":
                self.stages.poisoned(job)
        self.runner.suspects_maybe()
