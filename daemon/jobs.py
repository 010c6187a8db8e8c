"""Jobs, and the store interface every part of the service goes through.

A :class:`Job` is one input under one rule: unique on (content sha256, rule fingerprint), so duplicate events,
rescans and restarts find the existing job instead of making a second one. It is a frozen snapshot of the job's row;
it changes only through the store's **named transitions**, each one committed transaction:

    register ──► pending ──claim──► running ──finish──► done ──record_metrics──► (metrics recorded)
                    ▲                  │ ├──fail──────► failed
                    │                  │ └──retry_later─► pending (next_attempt_at)
                    └───release/recover┘
    record_move: where the input went (archive/ or failed/), after the commit that decided it
    requeue: a failed input dropped again (an explicit retry); rename: a pending input renamed while it waited

``claim`` also reserves the job's output path in the same transaction (the worker picks the path; the store checks
that no other job owns it), so a retry always writes to the same path and never makes a ``-1`` copy. ``finish``,
``fail``, ``retry_later`` and ``release`` take the claiming worker as ``owner``: a worker that lost its lease (its
node went stale and another node took the job over) can commit nothing for it.

Each daemon is a *node* (:class:`NodeStore`): it joins, heartbeats, and leaves. A heartbeat renews the node's row and
the lease of every job it runs; a running job whose lease is older than the stale timeout belongs to a dead node and
goes back to pending (``recover``). Lease times come from the store's *lease clock*, which every node shares (the
database server's clock on PostgreSQL), so one host's clock running ahead cannot make its peers' leases look stale.

Two stores implement both protocols (:class:`DaemonStore`): :class:`daemon.store.SqlStore` (SQLite or PostgreSQL,
the real one) and :class:`MemoryStore` here (for unit tests of the worker, the cluster and the dispositions). Both
pass one contract test suite (tests/integration/test_store_contract.py). The clock is injected: ``clock()`` gives
naive UTC datetimes.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any, Literal, Protocol

from daemon.config import Rule
from daemon.errors import NodeInUseError
from daemon.fsops import FileId, display, text_form
from daemon.metrics import Metric

STATES = ("pending", "running", "done", "failed")
STAGES = ("queue", "decode", "load", "infer", "encode", "write", "metrics", "total")
Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    """Naive UTC now: the store's default clock."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def worker_id(name: str | None = None) -> str:
    """The ``jobs.worker`` value of a claim: ``host:pid``, and ``/name`` for one of a daemon's worker threads."""
    base = f"{socket.gethostname()}:{os.getpid()}"
    return f"{base}/{name}" if name else base


def worker_pid(worker: str | None) -> int | None:
    """The pid in a ``jobs.worker`` value (``host:pid`` or ``host:pid/name``), if it has one."""
    pid = (worker or "").rpartition(":")[2].partition("/")[0]
    return int(pid) if pid.isdigit() else None


def worker_host(worker: str | None) -> str:
    return (worker or "").partition(":")[0]


def name_columns(rel: PurePosixPath) -> tuple[str, bytes | None]:
    """(``rel_path``, ``rel_path_raw``) for a name: a name that is not valid UTF-8 is stored as its printable form
    plus its exact bytes, so it is both shown and found again losslessly."""
    raw = os.fsencode(str(rel))
    try:
        raw.decode("utf-8")
        return str(rel), None
    except UnicodeDecodeError:
        return text_form(str(rel)), raw


def rel_from_columns(rel_path: str, raw: bytes | None) -> PurePosixPath:
    return PurePosixPath(os.fsdecode(raw)) if raw is not None else PurePosixPath(rel_path)


@dataclass(frozen=True)
class JobSpec:
    """What intake knows about a complete input, ready to register."""

    sha: str  # content sha256 (or a name-and-time key for a file that fails at intake, see `failure`)
    rule: Rule
    rel: PurePosixPath  # relative to the inbox (or the file name, for `upscaled process`)
    input_path: str  # absolute, printable
    source: str = "watch"  # watch, cli, bench
    folder: str | None = None  # the rule folder (default: the rule's)
    input_size: int | None = None
    input_id: FileId | None = None
    input_format: str | None = None
    input_width: int | None = None  # from the header, for the output's name and size before it is decoded
    input_height: int | None = None
    frames: int = 1
    fingerprint: str | None = None  # default: the rule's
    failure: Exception | None = None  # set when the file must fail without ever being offered to a worker
    bench_run_id: int | None = None  # the `upscaled bench` run the job belongs to (source "bench")

    def key(self) -> tuple[str, str]:
        return self.sha, self.fingerprint or self.rule.fingerprint()


@dataclass(frozen=True)
class Job:
    """A job as its row says right now. Frozen: the store's transitions return a new one."""

    id: int
    sha: str
    fingerprint: str
    state: str
    rule: Rule
    rel: PurePosixPath
    input_path: str
    source: str = "watch"
    folder: str = ""
    attempts: int = 0
    worker: str | None = None
    node: str | None = None
    input_size: int | None = None
    input_id: FileId | None = None
    input_format: str | None = None
    input_width: int | None = None
    input_height: int | None = None
    frames: int = 1
    output_path: str | None = None
    input_moved_to: str | None = None
    error_kind: str | None = None
    error: str | None = None
    metrics_state: str | None = None
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    next_attempt_at: dt.datetime | None = None
    bench_run_id: int | None = None
    recoveries: int = 0  # times taken back after its worker died
    alone_deaths: int = 0  # of those, while it was the only job in flight
    alone: bool = False  # its current claim runs alone in flight

    @property
    def name(self) -> str:
        """The input's name relative to the inbox, printable (``\\xNN`` for bytes that are not UTF-8)."""
        return display(str(self.rel))

    @property
    def model(self) -> str:
        return self.rule.model

    def queue_seconds(self) -> float:
        if self.started_at is None or self.created_at is None:
            return 0.0
        return max(0.0, (self.started_at - self.created_at).total_seconds())


@dataclass(frozen=True)
class Registered:
    job: Job
    created: bool


@dataclass(frozen=True)
class Finished:
    """A job's result, for :meth:`JobStore.finish`."""

    job_id: int
    owner: str | None  # the claiming worker (None: do not check)
    fields: Mapping[str, Any]  # job columns: sizes, device, precision, stage times, ...
    metrics: Sequence[Metric] = ()
    archive_path: str | None = None  # where the input will go, committed now so a crash before the move is repaired
    metrics_pending: bool = False  # the metrics come in a later commit (record_metrics)


# Picks a job's output path inside the claim: (job, taken) -> absolute path, where taken(path) says whether another
# job owns that path already.
OutputPlanner = Callable[[Job, Callable[[str], bool]], str]


class JobStore(Protocol):
    """The named transitions and the reads of the job store. Every method is one transaction."""

    clock: Clock

    def register(self, specs: Sequence[JobSpec], node: str | None = None) -> list[Registered]: ...
    def claim(
        self,
        worker: str,
        *,
        node: str | None = None,
        limit: int = 1,
        folders: Iterable[str] | None = None,
        source: str | None = None,
        job_id: int | None = None,
        plan: OutputPlanner | None = None,
        alone: bool = False,
    ) -> list[Job]: ...
    def finish(self, results: Sequence[Finished]) -> list[bool]: ...
    def record_metrics(self, job_id: int, results: Sequence[Metric], state: str = "done") -> None: ...
    def fail(
        self, job_id: int, kind: str, error: str, owner: str | None = None, fields: Mapping[str, Any] | None = None
    ) -> bool: ...
    def retry_later(self, job_id: int, kind: str, error: str, at: dt.datetime, owner: str | None = None) -> bool: ...
    def release(self, job_id: int, owner: str | None = None) -> bool: ...
    def record_move(self, job_id: int, dest: str | None) -> None: ...
    def requeue(self, job_id: int, rel: PurePosixPath, input_path: str, input_id: FileId | None) -> None: ...
    def rename(self, job_id: int, rel: PurePosixPath, input_path: str, input_id: FileId | None) -> None: ...
    def progress(self, job_id: int, text: str) -> None: ...
    def recover(
        self,
        stale_after: float | None = None,
        own_node: str | None = None,
        unowned: bool = False,
        spare: Callable[[Job], bool] | None = None,
        max_recoveries: int | None = None,
    ) -> list[Job]: ...
    def suspects(self, folders: Iterable[str] | None = None, source: str | None = None) -> int: ...
    def metrics_pending(self, node: str | None, stale_after: float, limit: int | None = None) -> list[Job]: ...
    def get(self, job_id: int) -> Job | None: ...
    def states(self, job_ids: Iterable[int]) -> dict[int, str]: ...
    def owner_of_output(self, path: str) -> int | None: ...
    def counts(self, node: str | None = None) -> dict[str, int]: ...
    def metrics_of(self, job_id: int) -> dict[str, float]: ...
    def record_hook(self, job_id: int, event: str, ok: bool, detail: str) -> None: ...
    def close(self) -> None: ...


def recovery(job: Job, now: dt.datetime, max_recoveries: int | None) -> dict[str, Any]:
    """The new values of ``job``'s row when it is taken back from a worker that died (both stores use this).

    It is counted (``recoveries``; ``alone_deaths`` too when its claim was ``alone``) and goes back to pending, its
    error recording when and where it was taken back (the last few times). At ``max_recoveries`` deaths alone it is
    failed as ``poison`` instead: a file that takes the service down with it is not tried again.
    """
    alone_deaths = job.alone_deaths + (1 if job.alone else 0)
    recoveries = job.recoveries + 1
    seen = f"died {now:%Y-%m-%d %H:%M:%S} on {job.worker or 'a worker'} ({'alone' if job.alone else 'with others'})"
    earlier = [part for part in (job.error or "").split("; ") if part.startswith("died ")][-(HISTORY - 1) :]
    history = "; ".join([*earlier, seen])
    values: dict[str, Any] = dict(
        state="pending", recoveries=recoveries, alone_deaths=alone_deaths, alone=False, error=history
    )
    if max_recoveries is not None and alone_deaths >= max_recoveries:
        values.update(
            state="failed",
            error_kind="poison",
            finished_at=now,
            error=f"poison: the service died {alone_deaths} times while this file was the only job in flight "
            f"(max_recoveries = {max_recoveries}; taken back {recoveries} times in all): {history}",
        )
    return values


HISTORY = 5  # the last times a job was taken back, kept in its error


# --- nodes -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeInfo:
    """What a node says about itself when it joins."""

    host: str
    pid: int
    device: str | None = None  # its devices, comma-separated
    workers: int | None = None  # worker threads in all
    folders: str | None = None  # JSON list of the rule folders it serves; None: all of them
    rules_fingerprint: str | None = None  # all nodes on one inbox must agree on the rules


NodeState = Literal["live", "stale", "stopped"]


@dataclass(frozen=True)
class NodeRow:
    """A node's row as read now. Ages are on the lease clock, so every node reads the same age."""

    name: str
    info: NodeInfo
    started_at: dt.datetime
    heartbeat_at: dt.datetime  # its last heartbeat, on the lease clock
    stopped_at: dt.datetime | None  # set by ``leave``; None while it runs (or after a crash)
    lease_age_s: float  # seconds since its last heartbeat: the age of every lease it holds
    clock_skew_s: float | None = None  # its host's clock minus the lease clock at its last heartbeat (None: unknown)

    def state(self, stale_after: float) -> NodeState:
        """``stopped`` after a clean ``leave``; ``stale`` once no heartbeat came for ``stale_after`` seconds (its
        jobs are taken over); ``live`` otherwise."""
        if self.stopped_at is not None:
            return "stopped"
        return "stale" if self.lease_age_s > stale_after else "live"


@dataclass(frozen=True)
class NodeStatus:
    """A node with what it runs and what it did: one row of ``upscaled nodes``."""

    row: NodeRow
    state: NodeState
    running: tuple[str, ...]  # the printable names of its running jobs, oldest claim first
    done: int  # jobs it finished, ever
    jobs_per_min: float  # jobs it finished over the window ``nodes`` was asked for

    def flat(self) -> dict[str, Any]:
        """The columns ``upscaled nodes`` prints, in order."""
        r, i = self.row, self.row.info
        return dict(
            node=r.name,
            state=self.state,
            host=i.host,
            pid=i.pid,
            lease_age_s=round(r.lease_age_s, 1),
            clock_skew_s=None if r.clock_skew_s is None else round(r.clock_skew_s, 3),
            started_at=r.started_at,
            device=i.device,
            workers=i.workers,
            folders=i.folders or "(all)",
            running=len(self.running),
            current=", ".join(self.running),
            done=self.done,
            jobs_per_min=self.jobs_per_min,
            rules_fingerprint=i.rules_fingerprint,
        )


@dataclass(frozen=True)
class Beat:
    """What one heartbeat did and saw."""

    at: dt.datetime  # the lease time it stamped, on the lease clock
    skew_s: float  # the store's clock minus the lease clock, in seconds (0.0 where they are one clock)
    uncertainty_s: float  # how far off ``skew_s`` may be: half the round trip that measured it


class NodeStore(Protocol):
    """The nodes sharing one store: join, heartbeat, list, leave. Every method is one transaction."""

    def join(self, node: str, info: NodeInfo, in_use: Callable[[NodeRow], bool]) -> NodeRow | None:
        """Enter ``node`` with ``info``, a fresh ``started_at`` and heartbeat, and no ``stopped_at``.

        Returns the row as it was before (None for a new name). ``in_use(before)`` decides, inside the transaction,
        whether that row is a live daemon that keeps the name.

        Raises:
            daemon.errors.NodeInUseError: ``in_use(before)`` is true; the row is left as it was.
        """
        ...

    def heartbeat(self, node: str) -> Beat:
        """Renew ``node``'s row and the lease of every job it runs, on the lease clock, and measure the skew of the
        store's clock against it.

        Raises:
            KeyError: ``node`` never joined (or its row is gone): it must join first.
        """
        ...

    def nodes(self, stale_after: float, window_s: float = 600.0, include_gone: bool = False) -> list[NodeStatus]:
        """The nodes by name, with their state and work; stopped and stale ones only with ``include_gone``.
        ``jobs_per_min`` counts the jobs each finished in the last ``window_s`` seconds."""
        ...

    def leave(self, node: str) -> None:
        """A clean shutdown: ``node`` is stopped and no longer expected to heartbeat."""
        ...


class DaemonStore(JobStore, NodeStore, Protocol):
    """Both protocols: what a daemon (its service, workers and cluster) needs of its store."""


class BenchStore(JobStore, Protocol):
    """What ``upscaled bench`` records besides its jobs: one row per run, which its jobs name
    (:attr:`JobSpec.bench_run_id`)."""

    def add_bench_run(self, settings_json: str, report_path: str | None = None) -> int:
        """A new run with its settings (JSON); returns its id."""
        ...

    def set_bench_report(self, run_id: int, report_path: str) -> None:
        """Where the run's HTML report was written."""
        ...


# --- the in-memory store ------------------------------------------------------------------------------------------
@dataclass
class _Row:
    job: Job
    fields: dict[str, Any] = field(default_factory=dict)
    metrics: list[Metric] = field(default_factory=list)
    heartbeat_at: dt.datetime | None = None
    progress: str | None = None


@dataclass
class _Node:
    info: NodeInfo
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    stopped_at: dt.datetime | None = None


class MemoryStore:
    """:class:`DaemonStore` in memory, with the same semantics as the SQL store (one lock = one transaction).

    For unit tests: the worker stepped over it with a fake clock, the cluster, the dispositions, the intake. Not
    durable. One clock: the lease clock is ``clock``, so a heartbeat's skew is 0.
    """

    def __init__(self, clock: Clock = utcnow) -> None:
        self.clock = clock
        self._rows: dict[int, _Row] = {}
        self._keys: dict[tuple[str, str], int] = {}
        self._ids = itertools.count(1)
        self._nodes: dict[str, _Node] = {}
        self._lock = threading.RLock()
        self.hooks: list[tuple[int, str, bool, str]] = []
        self.bench_runs: dict[int, dict[str, Any]] = {}  # id -> started_at, settings, report_path
        self.commits = 0  # transactions that changed something: what a group commit saves

    def _set(self, job_id: int, **changes: Any) -> Job:
        row = self._rows[job_id]
        row.job = replace(row.job, **changes)
        return row.job

    def register(self, specs: Sequence[JobSpec], node: str | None = None) -> list[Registered]:
        out = []
        with self._lock:
            now = self.clock()
            for spec in specs:
                key = spec.key()
                if key in self._keys:
                    out.append(Registered(self._rows[self._keys[key]].job, False))
                    continue
                job_id = next(self._ids)
                failing = spec.failure is not None
                job = Job(
                    id=job_id,
                    sha=key[0],
                    fingerprint=key[1],
                    state="running" if failing else "pending",
                    rule=spec.rule,
                    rel=spec.rel,
                    input_path=spec.input_path,
                    source=spec.source,
                    folder=spec.rule.folder if spec.folder is None else spec.folder,
                    attempts=1 if failing else 0,
                    worker=worker_id() if failing else None,
                    node=node if failing else None,
                    input_size=spec.input_size,
                    input_id=spec.input_id,
                    input_format=spec.input_format,
                    input_width=spec.input_width,
                    input_height=spec.input_height,
                    frames=spec.frames,
                    created_at=now,
                    started_at=now if failing else None,
                    bench_run_id=spec.bench_run_id,
                )
                self._rows[job_id] = _Row(job, heartbeat_at=now if failing and node else None)
                self._keys[key] = job_id
                out.append(Registered(job, True))
            self.commits += 1
        return out

    def claim(
        self,
        worker: str,
        *,
        node: str | None = None,
        limit: int = 1,
        folders: Iterable[str] | None = None,
        source: str | None = None,
        job_id: int | None = None,
        plan: OutputPlanner | None = None,
        alone: bool = False,
    ) -> list[Job]:
        with self._lock:
            now = self.clock()
            allowed = None if folders is None else set(folders)
            out: list[Job] = []
            order = sorted(self._rows.values(), key=lambda r: (alone and r.job.recoveries == 0, r.job.id))
            for row in order:
                j = row.job
                if len(out) >= (1 if alone else limit):
                    break
                if j.state != "pending" or (job_id is not None and j.id != job_id):
                    continue
                if job_id is None and not alone and j.recoveries > 0:
                    continue
                if job_id is None and j.next_attempt_at is not None and j.next_attempt_at > now:
                    continue
                if (allowed is not None and j.folder not in allowed) or (source is not None and j.source != source):
                    continue
                j = self._set(
                    j.id,
                    state="running",
                    started_at=now,
                    attempts=j.attempts + 1,
                    worker=worker,
                    node=node,
                    alone=alone,
                )
                row.heartbeat_at = now if node else None
                if plan is not None and j.output_path is None:

                    def taken(p: str, me: int = j.id) -> bool:
                        return self._owner(p) not in (None, me)

                    j = self._set(j.id, output_path=plan(j, taken))
                out.append(j)
            if out:
                self.commits += 1
            return out

    def _owner(self, path: str) -> int | None:
        return next((r.job.id for r in self._rows.values() if r.job.output_path == path), None)

    def _owned(self, job_id: int, owner: str | None) -> bool:
        j = self._rows[job_id].job
        return owner is None or (j.state == "running" and j.worker == owner)

    def finish(self, results: Sequence[Finished]) -> list[bool]:
        with self._lock:
            now = self.clock()
            done = []
            for r in results:
                if not self._owned(r.job_id, r.owner):
                    done.append(False)
                    continue
                self._set(
                    r.job_id,
                    state="done",
                    finished_at=now,
                    error=None,
                    error_kind=None,
                    input_moved_to=None if r.archive_path is None else text_form(r.archive_path),
                    metrics_state="pending" if r.metrics_pending else None,
                )
                row = self._rows[r.job_id]
                row.fields.update(r.fields)
                row.metrics = list(r.metrics)
                row.heartbeat_at = None
                done.append(True)
            self.commits += 1
            return done

    def record_metrics(self, job_id: int, results: Sequence[Metric], state: str = "done") -> None:
        with self._lock:
            row = self._rows[job_id]
            row.metrics = list(results)
            self._set(job_id, metrics_state=state)
            self.commits += 1

    def fail(
        self, job_id: int, kind: str, error: str, owner: str | None = None, fields: Mapping[str, Any] | None = None
    ) -> bool:
        with self._lock:
            if not self._owned(job_id, owner):
                return False
            self._set(job_id, state="failed", error_kind=kind, error=error, finished_at=self.clock())
            self._rows[job_id].fields.update(fields or {})
            self._rows[job_id].heartbeat_at = None
            self.commits += 1
            return True

    def retry_later(self, job_id: int, kind: str, error: str, at: dt.datetime, owner: str | None = None) -> bool:
        with self._lock:
            if not self._owned(job_id, owner):
                return False
            self._set(job_id, state="pending", error_kind=kind, error=error, next_attempt_at=at)
            self._rows[job_id].heartbeat_at = None
            self.commits += 1
            return True

    def release(self, job_id: int, owner: str | None = None) -> bool:
        with self._lock:
            j = self._rows[job_id].job
            if j.state != "running" or (owner is not None and j.worker != owner):
                return False
            self._set(job_id, state="pending", attempts=j.attempts - 1, node=None)
            self._rows[job_id].heartbeat_at = None
            self.commits += 1
            return True

    def record_move(self, job_id: int, dest: str | None) -> None:
        with self._lock:
            self._set(job_id, input_moved_to=None if dest is None else text_form(dest))
            self.commits += 1

    def requeue(self, job_id: int, rel: PurePosixPath, input_path: str, input_id: FileId | None) -> None:
        with self._lock:
            self._set(
                job_id,
                state="pending",
                rel=rel,
                input_path=input_path,
                input_id=input_id,
                input_moved_to=None,
                next_attempt_at=None,
                attempts=0,
                output_path=None,
            )
            self.commits += 1

    def rename(self, job_id: int, rel: PurePosixPath, input_path: str, input_id: FileId | None) -> None:
        with self._lock:
            self._set(job_id, rel=rel, input_path=input_path, input_id=input_id)
            self.commits += 1

    def progress(self, job_id: int, text: str) -> None:
        with self._lock:
            self._rows[job_id].progress = text

    def recover(
        self,
        stale_after: float | None = None,
        own_node: str | None = None,
        unowned: bool = False,
        spare: Callable[[Job], bool] | None = None,
        max_recoveries: int | None = None,
    ) -> list[Job]:
        with self._lock:
            now = self.clock()
            found = []
            for row in self._rows.values():
                j = row.job
                if j.state != "running":
                    continue
                stale = (
                    stale_after is not None
                    and j.node is not None
                    and (row.heartbeat_at is None or (now - row.heartbeat_at).total_seconds() > stale_after)
                )
                if not ((unowned and j.node is None) or (own_node is not None and j.node == own_node) or stale):
                    continue
                if spare is not None and spare(j):
                    continue
                found.append(self._set(j.id, node=None, **recovery(j, now, max_recoveries)))
                row.heartbeat_at = None
            if found:
                self.commits += 1
            return found

    def suspects(self, folders: Iterable[str] | None = None, source: str | None = None) -> int:
        with self._lock:
            now = self.clock()
            return sum(
                1
                for row in self._rows.values()
                if row.job.state == "pending"
                and row.job.recoveries > 0
                and (row.job.next_attempt_at is None or row.job.next_attempt_at <= now)
                and (folders is None or row.job.folder in set(folders))
                and (source is None or row.job.source == source)
            )

    def metrics_pending(self, node: str | None, stale_after: float, limit: int | None = None) -> list[Job]:
        with self._lock:
            due = (
                r.job
                for r in self._rows.values()
                if r.job.metrics_state == "pending"
                and r.job.source == "watch"
                and (node is None or r.job.node in (node, None))
            )
            return list(itertools.islice(due, limit))

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._rows.get(job_id)
            return None if row is None else row.job

    def states(self, job_ids: Iterable[int]) -> dict[int, str]:
        with self._lock:
            return {i: self._rows[i].job.state for i in job_ids if i in self._rows}

    def fields_of(self, job_id: int) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._rows[job_id].fields)

    def owner_of_output(self, path: str) -> int | None:
        with self._lock:
            return self._owner(path)

    def counts(self, node: str | None = None) -> dict[str, int]:
        with self._lock:
            out = dict.fromkeys(STATES, 0)
            for r in self._rows.values():
                if node is None or r.job.state != "running" or r.job.node == node:
                    out[r.job.state] += 1
            return out

    def metrics_of(self, job_id: int) -> dict[str, float]:
        with self._lock:
            return {m.name: m.value for m in self._rows[job_id].metrics}

    def record_hook(self, job_id: int, event: str, ok: bool, detail: str) -> None:
        with self._lock:
            self.hooks.append((job_id, event, ok, detail))

    # --- bench runs ------------------------------------------------------------------------------------------------
    def add_bench_run(self, settings_json: str, report_path: str | None = None) -> int:
        with self._lock:
            run_id = len(self.bench_runs) + 1
            self.bench_runs[run_id] = dict(started_at=self.clock(), settings=settings_json, report_path=report_path)
            self.commits += 1
            return run_id

    def set_bench_report(self, run_id: int, report_path: str) -> None:
        with self._lock:
            self.bench_runs[run_id]["report_path"] = report_path
            self.commits += 1

    # --- nodes (the lease clock is the store's clock) ------------------------------------------------------------
    def _node_row(self, name: str, now: dt.datetime) -> NodeRow:
        n = self._nodes[name]
        age = (now - n.heartbeat_at).total_seconds()
        return NodeRow(name, n.info, n.started_at, n.heartbeat_at, n.stopped_at, age, 0.0)

    def join(self, node: str, info: NodeInfo, in_use: Callable[[NodeRow], bool]) -> NodeRow | None:
        with self._lock:
            now = self.clock()
            before = self._node_row(node, now) if node in self._nodes else None
            if before is not None and in_use(before):
                raise NodeInUseError(node, before.info.host, before.info.pid)
            self._nodes[node] = _Node(info, started_at=now, heartbeat_at=now)
            self.commits += 1
            return before

    def heartbeat(self, node: str) -> Beat:
        with self._lock:
            if node not in self._nodes:
                raise KeyError(f"node {node!r} has not joined")
            now = self.clock()
            self._nodes[node].heartbeat_at = now
            for row in self._rows.values():
                if row.job.node == node and row.job.state == "running":
                    row.heartbeat_at = now
            self.commits += 1
            return Beat(now, 0.0, 0.0)

    def nodes(self, stale_after: float, window_s: float = 600.0, include_gone: bool = False) -> list[NodeStatus]:
        with self._lock:
            now = self.clock()
            since = now - dt.timedelta(seconds=window_s)
            out = []
            for name in sorted(self._nodes):
                row = self._node_row(name, now)
                state = row.state(stale_after)
                if state != "live" and not include_gone:
                    continue
                its = sorted((r.job for r in self._rows.values() if r.job.node == name), key=lambda j: j.id)
                done = [j for j in its if j.state == "done"]
                recent = sum(1 for j in done if j.finished_at is not None and j.finished_at >= since)
                running = tuple(j.name for j in its if j.state == "running")
                out.append(NodeStatus(row, state, running, len(done), round(recent * 60.0 / window_s, 2)))
            return out

    def leave(self, node: str) -> None:
        with self._lock:
            if node in self._nodes:
                self._nodes[node].stopped_at = self.clock()
                self.commits += 1

    def close(self) -> None:
        pass
