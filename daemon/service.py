"""The service: watch the inbox, register complete files as jobs, work the queue, keep the invariants.

A :class:`Service` is ``start() / step(wait) / shutdown()`` so tests can drive it one iteration at a time; ``run()``
is the loop around them for ``upscaled run``. Signal handlers only set a flag. The order of durable steps for a
job is: output written and fsynced -> job row committed ``done`` -> input moved to the archive. A crash between
any two is repaired at the next start, because registering a file whose job exists reconciles instead of redoing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

from daemon import logs
from daemon.config import Rule, Settings, load_settings
from daemon.errors import ConfigError, InternalError, UnreadableFileError
from daemon.fsops import (
    confined,
    fit_name,
    move_unique,
    remove_stale_temps,
    temp_files,
    unique_path,
    write_error_json,
)
from daemon.notify import Notifier
from daemon.pipeline import SIDECAR_SUFFIX, Pipeline, output_name, with_sidecar_prompt
from daemon.store import Registered, Store, utcnow, worker_id, worker_pid
from daemon.watcher import Watcher
from models import progress
from models.backends import backend_of
from models.catalog import get_entry
from models.errors import OutOfMemoryError, Retry, UnsupportedImageError, UpscaledError
from models.registry import ModelCache
from models.weights import fetch_command, needs_weights, present


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _may_live(host: str | None, pid: int | None) -> bool:
    """Whether process ``pid`` on ``host`` may still run: on another host it cannot be checked, so it may."""
    if host != socket.gethostname():
        return True
    return pid is not None and _pid_alive(pid)


def _worker_may_live(worker: str | None) -> bool:
    """:func:`_may_live` for a ``jobs.worker`` value (``host:pid`` or ``host:pid/name``)."""
    return _may_live((worker or "").partition(":")[0], worker_pid(worker))


def file_sha256(path: Path) -> str:
    """sha256 of a regular file; a symlink put in its place raises OSError (ELOOP) instead of being followed."""
    digest = hashlib.sha256()
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Worker:
    """One worker thread: the device its models run on, and what it is doing right now.

    ``job``, ``stage`` and ``beat`` feed STATUS=, the job row's progress and the watchdog; only the worker's own
    thread writes them.
    """

    name: str  # "cuda1.0": the device without its colon, and the worker's number on that device
    device: str
    beat: float  # the last sign of life; WATCHDOG=1 goes out only while every worker's is recent
    job: dict | None = None
    stage: str = ""
    next_progress_write: float = 0.0

    @property
    def claim_id(self) -> str:
        """What this worker writes into ``jobs.worker``: ``host:pid/name``, distinct for every worker thread."""
        return worker_id(self.name)


def check_devices(settings: Settings) -> list[str]:
    """The GPUs this node is told to use (``device``, and the ``device`` of each rule it serves), checked.

    Returns them resolved (``cuda`` -> ``cuda:0``). Without torch installed there is nothing to check: the
    classical and OpenCV backends run on the CPU whatever is asked.

    Raises:
        ConfigError: a GPU that PyTorch does not see. A worker on it would fail every job it claimed, jobs that a
            worker on another device could have done, so the node refuses to start instead.
    """
    served = [r for r in settings.all_rules() if settings.serve_folders is None or r.folder in settings.serve_folders]
    wanted = dict.fromkeys([*settings.devices(), *(r.device for r in served if r.device)])
    gpus = [d for d in wanted if d.startswith("cuda")]
    if not gpus:
        return []
    from models.devices import check

    try:
        return check(gpus)
    except UpscaledError as exc:
        raise ConfigError(f"device: {exc}") from None


def make_workers(settings: Settings, now: float) -> list[Worker]:
    """``workers`` workers for each device of the ``device`` setting."""
    return [Worker(f"{dev.replace(':', '')}.{i}", dev, now) for dev in settings.devices()
            for i in range(settings.workers)]


class Service:
    """The watch-folder service.

    Tests drive it with ``start() / step(wait) / shutdown()``, one iteration at a time in one thread, with the first
    worker. ``run()`` is what ``upscaled run`` calls: the main thread watches and admits files, talks to systemd
    and handles signals; each :class:`Worker` is a thread that claims and runs jobs on its device. Signal handlers
    only set flags.

    Workers on one device share the loaded model (one copy in memory); a model call holds the model's lock, so
    what overlaps is everything around it: decoding, encoding, writing, metrics, the database, and other models.
    """

    def __init__(self, settings: Settings, store: Store | None = None, cache: ModelCache | None = None,
                 clock: Callable[[], float] = time.monotonic, notifier: Notifier | None = None) -> None:
        self.settings = settings
        os.umask(int(settings.umask, 8))  # before the database file is created
        self.store = store or Store(settings.database)
        self.pipeline = Pipeline(settings, cache)
        self.clock = clock
        self.log = logs.get()
        self.notifier = notifier or Notifier()
        self.watcher = Watcher(settings.inbox, settings.ignore, settings.settle_seconds,
                               polling=settings.observer == "polling", poll_seconds=settings.poll_seconds)
        self.stopping = False
        self.workers = make_workers(settings, clock())
        self._reload = False
        self._next_rescan = 0.0
        self._next_status = 0.0
        self._lock = threading.Lock()
        self._waiting: dict[int, list[Path]] = defaultdict(list)  # duplicates waiting for a job to end
        self._wake = threading.Event()
        self._stop_work = threading.Event()
        self._stop_beat = threading.Event()
        self.node = settings.node()

    def _on_stage(self, worker: Worker, name: str) -> None:
        worker.beat = self.clock()
        worker.stage = name

    # --- life cycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        for folder in (s.inbox, s.outbox, s.archive, s.failed):
            folder.mkdir(parents=True, exist_ok=True)
        check_devices(s)
        self._register_node()
        # Before this node claims anything: its own previous life's jobs, unowned ones, and dead nodes' jobs.
        recovered = len(self._recover(own_node=self.node, unowned=True))
        # Other live nodes may be writing into a shared outbox right now: leave their young temp files alone.
        others = [n for n in self.store.nodes(s.stale_seconds) if n["node"] != self.node]
        stale = remove_stale_temps(s.outbox, older_than=s.stale_seconds if others else 0.0)
        self.watcher.start()
        self.watcher.rescan()
        self._next_rescan = self.clock() + s.rescan_seconds
        self._warn_missing_weights()
        self._warn_diffusion_on_cpu()
        self.log.info("service.started", inbox=str(s.inbox), outbox=str(s.outbox), database=s.database,
                      rules=len(s.all_rules()), observer=s.observer, recovered_jobs=recovered,
                      stale_temp_files=stale, pid=os.getpid(), systemd_notify=self.notifier.enabled)

    def _warn_missing_weights(self) -> None:
        for rule in self.settings.all_rules():
            entry = get_entry(rule.model)
            if needs_weights(entry) and not present(self.settings.weights_dir, entry):
                self.log.warning("weights.missing", model=rule.model, folder=rule.folder or "(default)",
                                 fix=fetch_command(rule.model))

    def _warn_diffusion_on_cpu(self) -> None:
        """A diffusion rule that would run on the CPU works, but slowly enough that the operator must know."""
        for rule in self.settings.all_rules():
            gen = rule.generation()
            if gen is None:
                continue
            backend = backend_of(rule.model)
            params = backend.parse_params(gen)
            for device in [rule.device] if rule.device else self.settings.devices():
                for cost in backend.warnings(get_entry(rule.model), params, device):
                    self.log.warning("diffusion.on_cpu", model=rule.model, folder=rule.folder or "(default)",
                                     device=device, cost=cost)

    # --- several nodes on one database ------------------------------------------------------------------------------
    def _node_info(self) -> dict:
        s = self.settings
        rules = hashlib.sha256(",".join(sorted(f"{r.folder}={r.fingerprint()}" for r in s.all_rules())).encode())
        return dict(host=socket.gethostname(), pid=os.getpid(), device=",".join(s.devices()), workers=len(self.workers),
                    folders=None if s.serve_folders is None else json.dumps(s.serve_folders),
                    rules_fingerprint=rules.hexdigest()[:16])

    def _register_node(self) -> None:
        """Enter this node in the ``nodes`` table; refuse to start under the name of a node that is alive.

        Raises:
            ConfigError: another live daemon (fresh heartbeat, not stopped, and on another host or with a running
                pid here) uses this node name. Two daemons with one name would take over each other's jobs.
        """
        info = self._node_info()
        before = self.store.heartbeat(self.node, info, start=True)
        if before is not None and before["stopped_at"] is None and before["pid"] != os.getpid():
            fresh = (utcnow() - before["heartbeat_at"]).total_seconds() < self.settings.stale_seconds
            if fresh and _may_live(before["host"], before["pid"]):
                self.store.heartbeat(self.node, {k: before[k] for k in info}, start=True)  # give the row back
                raise ConfigError(f"node name {self.node!r} is in use by pid {before['pid']} on {before['host']}; "
                                  "give every daemon its own node_name")
        others = {n["node"]: n for n in self.store.nodes(self.settings.stale_seconds) if n["node"] != self.node}
        differ = [name for name, n in others.items() if n.get("rules_fingerprint") not in
                  (None, info["rules_fingerprint"])]
        if differ:  # same file, other rules: two jobs and two outputs, so say it loudly
            self.log.warning("nodes.rules_differ", nodes=differ, note="all nodes on one inbox need the same rules")

    @staticmethod
    def _spare(job: dict) -> bool:
        """A running job with no node that an ``upscaled process`` or ``bench`` may still be working on.

        Those runs hold no lease. One on this host whose process is gone is recovered (it goes back to pending,
        and the command's next run of the file takes it); one on another host cannot be checked and is left alone.
        """
        return job["node"] is None and job["source"] != "watch" and _worker_may_live(job["worker"])

    def _recover(self, own_node: str | None = None, unowned: bool = False) -> list[dict]:
        found = self.store.recover_jobs(self.settings.stale_seconds, own_node=own_node, unowned=unowned,
                                        spare=self._spare)
        for job in found:
            pid = worker_pid(job["worker"])
            if job["output_path"] and pid is not None:  # the dead worker's half-written output, if it left one
                for tmp in temp_files(Path(job["output_path"]), pid):
                    tmp.unlink(missing_ok=True)
            self.log.warning("job.recovered", job=job["id"], file=job["rel_path"], from_node=job["node"],
                             from_worker=job["worker"])
        if found:
            self._wake.set()
        return found

    def heartbeat(self) -> None:
        """Renew this node's row and its running jobs' leases, then take over the jobs of dead nodes."""
        self.store.heartbeat(self.node)
        self._recover()

    def _beat_loop(self) -> None:
        while not self._stop_beat.wait(self.settings.heartbeat_seconds):
            try:
                self.heartbeat()
            except Exception as exc:  # the database is away: keep trying; the leases lapse only after stale_seconds
                self.log.error("heartbeat.error", error=repr(exc))

    def shutdown(self) -> None:
        self.watcher.stop()
        self._stop_beat.set()
        try:
            self.store.node_stopped(self.node)
        except Exception as exc:  # shutting down with the database away: the row just goes stale
            self.log.warning("node.stop_unrecorded", error=repr(exc))
        counts = self.store.counts()
        self.store.close()
        self.notifier.close()
        self.log.info("service.stopped", **counts)

    def request_stop(self, signum: int | None = None, _frame: object = None) -> None:
        if not self.stopping:
            self.log.info("service.stopping", signal=signal.Signals(signum).name if signum else None)
        self.stopping = True
        self._stop_work.set()
        self._wake.set()

    def request_reload(self, _signum: int | None = None, _frame: object = None) -> None:
        self._reload = True

    def run(self) -> int:
        """The service, until SIGTERM or SIGINT. Returns the exit code (0 for a requested stop)."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        self.start()
        threads = [threading.Thread(target=self._work_loop, args=(w,), name=f"upscaled-worker-{w.name}", daemon=True)
                   for w in self.workers]
        for t in threads:
            t.start()
        # Its own thread: a long hash or a slow share in the main loop must not let this node's leases lapse.
        threading.Thread(target=self._beat_loop, name="upscaled-heartbeat", daemon=True).start()
        self.notifier.ready(self.status_line())
        while not self.stopping:
            try:
                self.watch_step(wait=0.25)
                if self._reload:
                    self._reload = False
                    self.reload()
                self._tell_systemd()
            except Exception as exc:  # the watcher side must never take the service down
                self.log.error("loop.error", error=repr(exc), traceback=traceback.format_exc())
                time.sleep(1.0)
        # 1. Stop taking files. 2. Let the current jobs finish until the deadline. 3. Give back those that did not.
        self.watcher.stop()
        busy = [w.job["rel_path"] for w in self.workers if w.job is not None]
        self.notifier.stopping(f"stopping; finishing {', '.join(busy)}" if busy else "stopping")
        deadline = time.monotonic() + self.settings.stop_timeout
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            released = []
            for w, t in zip(self.workers, threads, strict=True):
                job = w.job
                if t.is_alive() and job is not None:
                    self.store.release(job["id"], owner=w.claim_id)
                    released.append(job["id"])
            self.log.warning("service.stop_deadline", seconds=self.settings.stop_timeout, released_jobs=released)
            self.shutdown()
            sys.stdout.flush()
            os._exit(0)  # a worker is inside native code and cannot be interrupted; its job is pending again
        self.shutdown()
        return 0

    def _work_loop(self, worker: Worker) -> None:
        while not self._stop_work.is_set():
            worker.beat = self.clock()
            try:
                did = self.work_step(worker)
            except Exception as exc:  # a store error (say, the disk is full): back off, never die
                self.log.error("worker.error", error=repr(exc), traceback=traceback.format_exc())
                did = False
                self._stop_work.wait(2.0)
            if not did:
                # Idle, the loop itself is the sign of life: wake often enough to stay well inside the watchdog.
                wd = self.notifier.watchdog_seconds
                self._wake.wait(min(0.5, wd / 6) if wd else 0.5)
                self._wake.clear()

    def reload(self) -> None:
        """SIGHUP: read the configuration again and use its rules for files admitted from now on.

        Queued jobs keep the rule they were registered with. A bad file is logged and the old settings stay.
        """
        try:
            new = load_settings(self.settings.config_file)
        except UpscaledError as exc:
            self.log.error("reload.failed", error=str(exc))
            return
        fixed = ("inbox", "outbox", "archive", "failed", "database", "observer", "node_name", "device", "workers")
        changed = [k for k in fixed if getattr(new, k) != getattr(self.settings, k)]
        if changed:
            self.log.warning("reload.needs_restart", keys=changed)
            new = new.model_copy(update={k: getattr(self.settings, k) for k in fixed})
        self.settings = new
        self.pipeline.settings = new
        self.watcher.patterns = new.ignore
        self.watcher.settle = new.settle_seconds
        self._warn_missing_weights()
        self._warn_diffusion_on_cpu()
        self.log.info("reload.done", rules=len(new.all_rules()))

    def status_line(self) -> str:
        c = self.store.counts()
        busy = [(w.job, w.stage) for w in self.workers if w.job is not None]
        doing = "working on " + ", ".join(f"{job['rel_path']} ({job['model_id']} x{job['outscale']:g}, {stage})"
                                          for job, stage in busy) if busy else "idle"
        return f"{doing}; queue {c['pending']}; done {c['done']}, failed {c['failed']}"

    def _tell_systemd(self) -> None:
        now = self.clock()
        if not self.notifier.enabled or now < self._next_status:
            return
        interval = self.notifier.watchdog_seconds or 10.0
        self._next_status = now + min(2.0, interval / 3)
        self.notifier.status(self.status_line())
        # A hung worker, any one of them, stops the pings, and systemd restarts the service after WatchdogSec.
        if self.notifier.watchdog_seconds and all(now - w.beat < self.notifier.watchdog_seconds / 2
                                                  for w in self.workers):
            self.notifier.watchdog()

    def step(self, wait: float = 0.0) -> bool:
        """One iteration in the calling thread: take in events, admit ready files, run at most one job (as the
        first worker)."""
        self.watch_step(wait)
        return False if self.stopping else self.work_step()

    def watch_step(self, wait: float = 0.0) -> None:
        """Take in watcher events (waiting up to ``wait``), rescan when due, and admit the files that settled."""
        deadline = self.watcher.next_deadline(self.clock())
        self.watcher.drain(timeout=min(wait, deadline) if deadline is not None else wait)
        now = self.clock()
        if now >= self._next_rescan:
            found = self.watcher.rescan()
            if found:
                self.log.info("rescan.found", files=found)
            self._next_rescan = now + self.settings.rescan_seconds
        for path in self.watcher.ready(now):
            reg = self.admit(path)
            if reg is not None and reg.created:
                self._wake.set()

    def work_step(self, worker: Worker | None = None) -> bool:
        """Claim and run one job as ``worker`` (default: the first). True if there was one."""
        worker = worker or self.workers[0]
        job = self.store.claim(node=self.node, folders=self.settings.serve_folders, worker=worker.claim_id,
                               source="watch")
        if job is None:
            return False
        self.execute(job, worker)
        return True

    # --- admitting files -----------------------------------------------------------------------------------------
    def admit(self, path: Path) -> Registered | None:
        """Register a complete file as a job, or reconcile it with the job that already exists."""
        s = self.settings
        try:
            st = os.lstat(path)
            rel = path.relative_to(s.inbox)
        except (FileNotFoundError, ValueError):
            return None
        rel_posix = PurePosixPath(rel.as_posix())
        rule = s.rule_for(str(rel_posix.parent))
        problem: UpscaledError | None = None
        if stat.S_ISLNK(st.st_mode):
            problem = UnsupportedImageError(f"{rel} is a symbolic link; links are not followed out of the inbox")
        elif not stat.S_ISREG(st.st_mode):
            problem = UnsupportedImageError(f"{rel} is not a regular file")
        else:
            try:
                sha = file_sha256(path)
            except FileNotFoundError:
                return None
            except OSError as exc:
                problem = UnreadableFileError(f"cannot read {rel}: {exc.strerror or exc}")
        if problem is None:
            try:  # a `<name>.prompt.txt` beside the input is that image's prompt: part of its rule and fingerprint
                rule = with_sidecar_prompt(rule, path)
            except UpscaledError as exc:
                problem = exc
        if problem is not None:  # a job of its own, keyed on the name and time, so it fails exactly once
            sha = "x" + hashlib.sha256(f"{rel}:{st.st_mtime_ns}:{st.st_ino}".encode()).hexdigest()[1:]
        fields = dict(source="watch", folder=rule.folder, rel_path=str(rel_posix), input_path=str(path),
                      input_size=st.st_size, model_id=rule.model, scale=rule.scale, outscale=rule.final_scale,
                      mode=rule.mode, rule_json=rule.model_dump_json())
        reg = self.store.register(sha, rule.fingerprint(), fields, state="pending" if problem is None else "running",
                                  node=self.node)
        if reg.created:
            self.log.debug("job.registered", job=reg.job_id, file=str(rel_posix), rule=rule.folder or "(default)")
            if problem is not None:  # registered as running: no worker ever sees it
                self._failed(self.store.get(reg.job_id), problem)
            return reg
        self._reconcile(reg, path, rel_posix)
        return reg

    def _reconcile(self, reg: Registered, path: Path, rel: PurePosixPath) -> None:
        """A file whose job exists: finish an interrupted move, archive a duplicate, or wait for the job."""
        job = self.store.get(reg.job_id)
        assert job is not None
        if not os.path.lexists(path):  # another node (or our worker) moved it while we hashed it: nothing to do
            return
        same = job["input_path"] == str(path)
        if job["state"] == "done":
            # The archive path the worker planned and committed with `finish`, so that this node and the worker
            # (perhaps on another host, seeing the same share) aim at one name and only the first move succeeds.
            planned = job["input_moved_to"] if same and job["input_moved_to"] else None
            dest = self._finish_input(path, Path(planned)) if planned and not self.settings.delete_inputs \
                else self._move_input(path, self.settings.archive, rel)
            if same and dest is not None:  # None: the worker moved it a moment ago, and recorded where
                self.store.update(job["id"], input_moved_to=str(dest))
            self.log.info("job.input_archived" if same else "duplicate.archived", job=job["id"], file=str(rel),
                          output=job["output_path"], moved_to=str(dest) if dest else None)
        elif job["state"] == "failed":
            if same and job["input_moved_to"] is None:  # committed, not yet moved
                if self._owner_may_still_move(job):
                    self.watcher.forget(path)  # its owner moves it in a moment; if it died instead, a rescan sees it
                else:  # the crash came between the commit and the move
                    self._move_failed(job, path, rel, job["error_kind"] or "error", job["error"] or "")
            else:  # dropped in again after failing: the user asks for another try
                self.store.update(job["id"], state="pending", input_path=str(path), rel_path=str(rel),
                                  input_moved_to=None, next_attempt_at=None, attempts=0, output_path=None)
                self.log.info("job.retry_requested", job=job["id"], file=str(rel))
        elif not same:
            if Path(job["input_path"]).exists():
                with self._lock:  # same content, another name: decided when the job ends
                    self._waiting[job["id"]].append(path)
            else:  # the file was renamed while it waited
                self.store.update(job["id"], input_path=str(path), rel_path=str(rel))

    def _owner_may_still_move(self, job: dict) -> bool:
        """Whether the worker that failed ``job`` a moment ago may be about to move its input to failed/.

        It moves it right after its commit: a worker of a live process on this host (this one included), or one on
        another host within ``stale_seconds`` of the commit, is left to do so, rather than two movers racing.
        """
        if job["finished_at"] is None or (utcnow() - job["finished_at"]).total_seconds() > self.settings.stale_seconds:
            return False
        return _worker_may_live(job["worker"])

    # --- running a job -------------------------------------------------------------------------------------------
    def _progress(self, worker: Worker, done: int, total: int, unit: str = "tile") -> None:
        """From inside a model call: a tile or a denoising step is done. Feeds STATUS=, the job row and the log."""
        now = self.clock()
        worker.beat = now
        worker.stage = f"{unit} {done}/{total}"
        job = worker.job
        if job is not None and (now >= worker.next_progress_write or done == total):
            worker.next_progress_write = now + 2.0  # at most one row update and log line every 2 s
            self.store.update(job["id"], progress=worker.stage)
            self.log.info("job.progress", job=job["id"], file=job["rel_path"], progress=worker.stage)

    def execute(self, job: dict, worker: Worker | None = None) -> None:
        worker = worker or self.workers[0]
        worker.job, worker.stage = job, "starting"
        rule = Rule.model_validate_json(job["rule_json"])
        src = Path(job["input_path"])
        queue_s = (job["started_at"] - job["created_at"]).total_seconds()
        log = self.log.bind(job=job["id"], file=job["rel_path"], model=rule.model, scale=rule.final_scale)
        if len(self.workers) > 1:
            log = log.bind(worker=worker.name)
        try:
            if src.is_symlink():  # replaced by a link while it waited: never follow it
                raise UnsupportedImageError(f"{job['rel_path']} is a symbolic link; links are not followed")
            if not src.is_file():
                self.store.fail(job["id"], "vanished", f"{src} disappeared before it was processed")
                log.warning("job.vanished")
                return
            with progress.reporting(partial(self._progress, worker)):
                result = self.pipeline.run(rule, src, lambda fmt: self._output_path(job, rule, fmt),
                                           device=worker.device, on_stage=partial(self._on_stage, worker))
        except UpscaledError as exc:
            self._handle_error(job, exc, log)
        except MemoryError:
            self._handle_error(job, OutOfMemoryError("out of memory while processing"), log)
        except Exception as exc:  # a bug or a library's surprise: this job fails, the service goes on
            log.error("job.crashed", error=repr(exc), traceback=traceback.format_exc())
            self._handle_error(job, InternalError(f"unexpected {type(exc).__name__}: {exc}"), log)
        else:
            fields = dict(result.fields, t_queue=queue_s)
            # The archive name is chosen now and committed with the result: one transaction fewer per job, and a
            # crash before the move below is finished by the next start's reconcile.
            planned = None if self.settings.delete_inputs else \
                unique_path(confined(self.settings.archive, job["rel_path"]))
            fields["input_moved_to"] = None if planned is None else str(planned)
            if not self.store.finish(job["id"], fields, result.metrics, owner=job["worker"]):
                # Our lease lapsed and another node took the job over: its result and its archive move count.
                log.warning("job.lease_lost", note="another node owns this job now; its result is kept")
                return
            dest = self._finish_input(src, planned)
            if dest is None and planned is not None and not src.exists():
                pass  # another node's reconcile moved it first, and recorded where
            elif dest != planned:
                self.store.update(job["id"], input_moved_to=None if dest is None else str(dest))
            metric_values = {m.name: round(m.value, 4) for m in result.metrics}
            log.info("job.done", device=fields.get("device"), output=job.get("output_path"),
                     seconds=round(fields["t_total"], 3), queue_s=round(queue_s, 3),
                     moved_to=str(dest) if dest else None, notes=result.notes or None, **metric_values)
        finally:
            self.watcher.finished(src)
            worker.job, worker.stage = None, ""
            with self._lock:
                waiting = self._waiting.pop(job["id"], [])
            for path in waiting:
                self.admit(path)

    def _output_path(self, job: dict, rule: Rule, fmt: str) -> Path:
        """Pick the output path once and record it before anything is written, so a retry reuses it."""
        if job.get("output_path"):
            return Path(job["output_path"])
        rel_dir = PurePosixPath(job["rel_path"]).parent
        name = output_name(rule, Path(job["rel_path"]), fmt)
        target = confined(self.settings.outbox, rel_dir / name)
        if target.exists() and self.store.owns_output(str(target)) != job["id"]:
            target = unique_path(target)  # never overwrite someone else's file
        self.store.update(job["id"], output_path=str(target))
        job["output_path"] = str(target)
        return target

    def _finish_input(self, src: Path, planned: Path | None, reserved: bool = True) -> Path | None:
        """Delete the input (``planned`` is None) or move it to its planned archive path (or a free variant).
        ``reserved``: ``planned`` was committed with the job for this file (see :func:`move_unique`).

        The job is committed already, so a failure here only leaves the input in the inbox, and the next scan
        archives it (see :meth:`_reconcile`).
        """
        try:
            if planned is None:
                src.unlink(missing_ok=True)
                self._move_sidecar(src, None)
                return None
            dest = move_unique(src, planned, reserved=reserved)
            self._move_sidecar(src, dest)
            return dest
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.log.error("archive.failed", file=str(src), error=str(exc), note="kept in the inbox; retried on rescan")
            return None

    @staticmethod
    def _move_sidecar(src: Path, dest: Path | None) -> None:
        """A ``<name>.prompt.txt`` beside an input goes where the input went (or is deleted with it)."""
        side = src.with_name(src.name + SIDECAR_SUFFIX)
        if not side.is_file() or side.is_symlink():
            return
        if dest is None:
            side.unlink(missing_ok=True)
        else:
            move_unique(side, dest.with_name(fit_name(dest.name + SIDECAR_SUFFIX)))

    def _move_input(self, src: Path, root: Path, rel: PurePosixPath) -> Path | None:
        planned = None if root == self.settings.archive and self.settings.delete_inputs else confined(root, rel)
        return self._finish_input(src, planned, reserved=False)

    def _handle_error(self, job: dict, exc: UpscaledError, log) -> None:  # noqa: ANN001
        backoff = exc.retry is Retry.BACKOFF and job["attempts"] < self.settings.max_attempts
        if exc.retry is Retry.UNTIL_FIXED or backoff:
            delay = min(self.settings.retry_max_seconds, self.settings.retry_seconds * 2 ** (job["attempts"] - 1))
            if self.store.retry_later(job["id"], exc.kind, str(exc), utcnow() + dt.timedelta(seconds=delay),
                                      owner=job.get("worker")):
                log.warning("job.retry", kind=exc.kind, error=str(exc), attempt=job["attempts"], in_seconds=delay)
            else:
                log.warning("job.lease_lost", note="another node took this job over; its outcome is theirs")
            return
        self._failed(job, exc)

    def _failed(self, job: dict, exc: UpscaledError) -> None:
        if not self.store.fail(job["id"], exc.kind, str(exc), owner=job.get("worker")):
            # Our lease went stale and another node owns the job now: its input is theirs to move.
            self.log.warning("job.lease_lost", job=job["id"], file=job["rel_path"], kind=exc.kind)
            return
        self._move_failed(job, Path(job["input_path"]), PurePosixPath(job["rel_path"]), exc.kind, str(exc))
        self.log.warning("job.failed", job=job["id"], file=job["rel_path"], kind=exc.kind, error=str(exc))

    def _move_failed(self, job: dict, src: Path, rel: PurePosixPath, kind: str, error: str) -> None:
        """Put the input in failed/ beside ``<name>.error.json``; the reason is written first.

        If failed/ cannot be written, the input stays in the inbox and the next scan tries again.
        """
        if not os.path.lexists(src):
            return
        info = dict(file=str(rel), job=job["id"], kind=kind, error=error, model=job["model_id"],
                    scale=job["outscale"], folder=job["folder"], attempts=job["attempts"],
                    failed_at=utcnow().isoformat() + "Z")
        try:
            dest = unique_path(confined(self.settings.failed, rel))
            reason = dest.with_name(fit_name(dest.name + ".error.json"))
            write_error_json(reason, info)
            try:
                moved = move_unique(src, dest)
            except FileNotFoundError:  # another node's reconcile moved it a moment ago, and records where
                if not dest.exists():  # it went elsewhere: this reason file belongs to no image
                    reason.unlink(missing_ok=True)
                return
            if moved != dest:  # the name was taken meanwhile: the reason goes with the image
                os.replace(reason, moved.with_name(fit_name(moved.name + ".error.json")))
            self._move_sidecar(src, moved)  # kept with its image, for a retry
        except (OSError, UpscaledError) as exc:
            self.log.error("quarantine.failed", file=str(rel), error=str(exc), note="kept in the inbox")
            return
        self.store.update(job["id"], input_moved_to=str(moved))


def process_once(settings: Settings, files: list[Path], rule: Rule, out_dir: Path, force: bool = False,
                 store: Store | None = None) -> list[dict]:
    """``upscaled process``: run files through the same pipeline and history, without touching the inputs.

    Returns one report dict per file. A bad file fails its own job; the others go on.
    """
    store = store or Store(settings.database)
    pipeline = Pipeline(settings)
    base_rule = rule
    reports = []
    for path in files:
        path = path.resolve()  # a link the user names on the command line is theirs to follow
        report: dict = dict(file=str(path), state="failed", output=None, error=None, job=None)
        reports.append(report)
        try:
            sha = file_sha256(path)
            rule = with_sidecar_prompt(base_rule, path)  # the image's own prompt, as in the watch folders
        except OSError as exc:
            report["error"] = f"cannot read {path}: {exc.strerror or exc}"
            continue
        except UpscaledError as exc:
            report["error"] = f"{exc.kind}: {exc}"
            continue
        fingerprint = hashlib.sha256(f"{rule.fingerprint()}:{out_dir.resolve()}".encode()).hexdigest()[:16]
        fields = dict(source="cli", folder="(cli)", rel_path=path.name, input_path=str(path),
                      input_size=path.stat().st_size, model_id=rule.model, scale=rule.scale,
                      outscale=rule.final_scale, mode=rule.mode, rule_json=rule.model_dump_json())
        reg = store.register(sha, fingerprint, fields)
        report["job"] = reg.job_id
        if not reg.created:
            job = store.get(reg.job_id)
            if job["state"] == "done" and not force and job["output_path"] and Path(job["output_path"]).exists():
                report.update(state="skipped", output=job["output_path"],
                              error="already processed with this rule and --out (use --force to redo)")
                continue
            store.update(reg.job_id, state="pending", input_path=str(path), next_attempt_at=None)
        job = store.claim(job_id=reg.job_id)
        if job is None:
            report["error"] = "another process is working on this job"
            continue

        def out_path(fmt: str, job: dict = job, path: Path = path, rule: Rule = rule) -> Path:
            if job.get("output_path") and Path(job["output_path"]).parent == out_dir.resolve():
                return Path(job["output_path"])
            target = confined(out_dir, output_name(rule, path, fmt))
            if target.exists() and store.owns_output(str(target)) != job["id"]:
                target = unique_path(target)
            store.update(job["id"], output_path=str(target))
            return target

        try:
            result = pipeline.run(rule, path, out_path)
        except UpscaledError as exc:
            store.fail(job["id"], exc.kind, str(exc))
            report["error"] = f"{exc.kind}: {exc}"
            continue
        except MemoryError:
            store.fail(job["id"], OutOfMemoryError.kind, "out of memory")
            report["error"] = "out of memory"
            continue
        store.finish(job["id"], dict(result.fields, t_queue=0.0), result.metrics)
        row = store.get(job["id"])
        report.update(state="done", output=row["output_path"], seconds=result.fields["t_total"],
                      **{m.name: m.value for m in result.metrics})
        if result.notes:
            report["notes"] = "; ".join(result.notes)
    return reports
