"""The durable job store: SQLAlchemy 2 Core over SQLite (WAL, busy timeout) or any SQLAlchemy URL.

A job is unique on (content sha256, rule fingerprint): duplicate events, rescans and restarts find the existing row
instead of making a second one. The worker's whole life with a job goes through this small interface: register,
claim, set the output path, finish or fail. Every state change is one committed transaction.

Times are UTC, stored by SQLAlchemy as ``YYYY-MM-DD HH:MM:SS.ffffff`` text on SQLite, so ``datetime('now')``
comparisons work in ad-hoc SQL.

Several daemons may share one PostgreSQL database (see README, "Scaling out"). Each daemon is a *node* with a row in
``nodes`` that it heartbeats; a job it claims records the node and the worker (host:pid) and carries the node's
heartbeat in ``jobs.heartbeat_at``. A running job whose heartbeat is older than the stale timeout belongs to a dead
node and goes back to pending (:meth:`Store.recover`). The schema is managed by Alembic (``daemon/migrations``);
opening a :class:`Store` upgrades it to the newest revision.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    case,
    create_engine,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from daemon.metrics import Metric
from daemon.migrations import VIEWS_0001

SCHEMA_VERSION = 3  # 2: bench_runs, jobs.bench_run_id; 3: nodes, jobs.node, jobs.heartbeat_at (Alembic 0002)
STATES = ("pending", "running", "done", "failed")
STAGES = ("queue", "decode", "load", "infer", "encode", "write", "metrics", "total")

metadata = MetaData()

# One row per `upscaled bench` run; its jobs (source "bench") point back to it through jobs.bench_run_id.
bench_runs = Table(
    "bench_runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("started_at", DateTime, nullable=False),
    Column("settings", Text, nullable=False),  # JSON: dataset, models, scales, downscale, device, ...
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("content_sha256", String(64), nullable=False),
    Column("rule_fingerprint", String(32), nullable=False),
    Column("state", String(16), nullable=False, default="pending"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error_kind", String(64)),
    Column("error", Text),
    Column("next_attempt_at", DateTime),
    Column("source", String(16), nullable=False, default="watch"),  # watch, cli, bench
    Column("folder", Text, nullable=False, default=""),  # the rule folder, relative to the inbox
    Column("rel_path", Text, nullable=False),  # the input, relative to the inbox (or as given to `process`)
    Column("input_path", Text, nullable=False),
    Column("input_size", Integer),
    Column("input_width", Integer),
    Column("input_height", Integer),
    Column("input_format", String(16)),
    Column("input_mode", String(16)),
    Column("bits", Integer),
    Column("output_path", Text),
    Column("output_size", Integer),
    Column("output_width", Integer),
    Column("output_height", Integer),
    Column("output_format", String(16)),
    Column("input_moved_to", Text),  # where the input went: archive/ or failed/ (NULL: deleted or not yet)
    Column("model_id", String(64), nullable=False),
    Column("backend", String(32)),
    Column("scale", Float, nullable=False),
    Column("outscale", Float, nullable=False),
    Column("mode", String(16), nullable=False),
    Column("device", String(16)),
    Column("precision", String(16)),  # "fp32", "fp16", or "fp16->fp32" after a NaN fallback
    Column("rule_json", Text),
    Column("worker", String(128)),
    Column("progress", String(64)),  # the running job's last reported progress: "tile 3/12", "step 20/50"
    Column("gen_params", Text),  # JSON: a diffusion job's prompt, negative_prompt, seed, steps, guidance, noise level
    Column("created_at", DateTime, nullable=False),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("updated_at", DateTime, nullable=False),
    *[Column(f"t_{s}", Float) for s in STAGES],
    Column("bench_run_id", Integer, ForeignKey("bench_runs.id")),  # set on source "bench" rows only
    # The node (daemon) that claimed the job, and that node's last heartbeat while it runs the job. NULL node: the
    # job was claimed outside the heartbeat protocol (`upscaled process`, `bench`, or a database from before).
    Column("node", String(128)),
    Column("heartbeat_at", DateTime),
    UniqueConstraint("content_sha256", "rule_fingerprint", name="uq_jobs_content_rule"),
    Index("ix_jobs_state", "state", "next_attempt_at"),
    Index("ix_jobs_model", "model_id"),
    Index("ix_jobs_created", "created_at"),
    Index("ix_jobs_node", "node", "state"),
)

# One row per daemon (node) that ever ran against this database; `upscaled nodes` reads it.
nodes = Table(
    "nodes",
    metadata,
    Column("name", String(128), primary_key=True),  # `node_name`, by default the host name
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("heartbeat_at", DateTime, nullable=False),
    Column("stopped_at", DateTime),  # set by a clean shutdown; NULL while it runs (or after a crash)
    Column("device", String(32)),
    Column("workers", Integer),
    Column("folders", Text),  # JSON list of the rule folders it serves; NULL: all of them
    Column("rules_fingerprint", String(32)),  # all nodes on one inbox must agree on the rules
)

metrics = Table(
    "metrics",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(32), nullable=False),
    Column("value", Float),
    Column("space", String(16), nullable=False),
    Column("shave", Integer, nullable=False),
    Column("reference", String(16), nullable=False),
    Column("protocol", Text, nullable=False),
    UniqueConstraint("job_id", "name", name="uq_metrics_job_name"),
    Index("ix_metrics_name", "name"),
)

meta = Table("meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text))

# The views as the migrations create them (revision 0001; a later revision that changes a view updates this too).
VIEWS = VIEWS_0001


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def worker_id(name: str | None = None) -> str:
    """The ``jobs.worker`` value of a claim: ``host:pid``, and ``/name`` for one of a daemon's worker threads."""
    base = f"{socket.gethostname()}:{os.getpid()}"
    return f"{base}/{name}" if name else base


def worker_pid(worker: str | None) -> int | None:
    """The pid in a ``jobs.worker`` value (``host:pid`` or ``host:pid/name``), if it has one."""
    pid = (worker or "").rpartition(":")[2].partition("/")[0]
    return int(pid) if pid.isdigit() else None


@dataclass
class Registered:
    job_id: int
    state: str
    created: bool
    input_path: str
    output_path: str | None


def make_engine(url: str, readonly: bool = False) -> Engine:
    """An engine with the SQLite settings the service relies on (WAL, busy timeout, full sync, FKs)."""
    if url.startswith("sqlite:///") and ":memory:" not in url:
        path = Path(url[len("sqlite:///"):])
        if readonly:
            if not path.exists():
                raise FileNotFoundError(f"database {path} does not exist yet")
            url = f"sqlite:///file:{path}?mode=ro&uri=true"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
    # pool_pre_ping: a PostgreSQL server restart or a dropped NAT entry must not fail the next claim.
    engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {},
                           pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            if not readonly:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")  # a committed job survives a power cut
            else:
                cur.execute("PRAGMA query_only=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):  # noqa: ANN001
            # IMMEDIATE takes the write lock up front, so two processes never deadlock upgrading a read lock.
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


class Store:
    """Jobs and metrics. Every method is one transaction."""

    def __init__(self, url: str, upgrade: bool = True) -> None:
        """Open the database at ``url`` and, unless ``upgrade`` is False, migrate it to the newest schema.

        Raises:
            sqlalchemy.exc.OperationalError: the database cannot be reached or written.
        """
        self.url = url
        self.engine = make_engine(url)
        if upgrade:
            self.upgrade()

    def upgrade(self) -> tuple[str | None, str]:
        """Bring the schema to the newest Alembic revision; returns (revision before, revision after).

        Safe to run from several daemons at once: SQLite serialises it with BEGIN IMMEDIATE, PostgreSQL with an
        advisory lock, and the whole upgrade is one transaction (both databases have transactional DDL).
        """
        from daemon.migrations import upgrade

        return upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- the worker's interface ----------------------------------------------------------------------------------
    def register(self, sha: str, fingerprint: str, fields: Mapping[str, Any], state: str = "pending",
                 node: str | None = None) -> Registered:
        """Create the job for (sha, fingerprint), or return the one that exists. Idempotent, across processes too.

        ``state="running"`` creates it already claimed by this process (owned by ``node``), for a file that must
        fail without ever being offered to a worker (a symlink, say).
        """
        now = utcnow()
        key = (jobs.c.content_sha256 == sha) & (jobs.c.rule_fingerprint == fingerprint)
        with self.engine.begin() as c:
            row = c.execute(select(jobs.c.id, jobs.c.state, jobs.c.input_path, jobs.c.output_path).where(key)).first()
            if row is not None:
                return Registered(row.id, row.state, False, row.input_path, row.output_path)
            try:
                with c.begin_nested():
                    claimed = dict(attempts=1, started_at=now, worker=worker_id(), node=node, heartbeat_at=now) \
                        if state == "running" else {}
                    res = c.execute(jobs.insert().values(
                        content_sha256=sha, rule_fingerprint=fingerprint, state=state, created_at=now,
                        updated_at=now, **({"attempts": 0} | claimed), **fields))
            except IntegrityError:  # another process registered it between our select and insert
                row = c.execute(select(jobs.c.id, jobs.c.state, jobs.c.input_path, jobs.c.output_path)
                                .where(key)).one()
                return Registered(row.id, row.state, False, row.input_path, row.output_path)
            return Registered(res.inserted_primary_key[0], state, True, fields["input_path"], None)

    def claim(self, now: dt.datetime | None = None, job_id: int | None = None, node: str | None = None,
              folders: Iterable[str] | None = None, worker: str | None = None,
              source: str | None = None) -> dict | None:
        """Move the oldest due pending job (or ``job_id``) to running and return its row, or None.

        ``node`` records the claiming daemon (it must then heartbeat, see :meth:`heartbeat`); ``folders`` limits
        the claim to jobs of those rule folders (None: any); ``source`` to jobs of that source (a daemon takes
        ``watch`` jobs only: a ``cli`` or ``bench`` job's input is not the daemon's to move); ``worker`` names the
        claiming worker (default host:pid). Exactly one caller wins a job: on PostgreSQL the candidate row is
        locked with ``FOR UPDATE SKIP LOCKED``, so concurrent workers take different jobs without waiting for each
        other; on SQLite, BEGIN IMMEDIATE serialises the claim. The compare-and-set update is the last guard on both.
        """
        now = now or utcnow()
        with self.engine.begin() as c:
            q = select(jobs.c.id).where(jobs.c.state == "pending")
            if job_id is not None:
                q = q.where(jobs.c.id == job_id)
            else:
                q = q.where((jobs.c.next_attempt_at.is_(None)) | (jobs.c.next_attempt_at <= now))
            if folders is not None:
                q = q.where(jobs.c.folder.in_(list(folders)))
            if source is not None:
                q = q.where(jobs.c.source == source)
            # SQLite's compiler renders no FOR UPDATE: there the write lock of BEGIN IMMEDIATE does the same job.
            row = c.execute(q.order_by(jobs.c.id).limit(1).with_for_update(skip_locked=True)).first()
            if row is None:
                return None
            done = c.execute(
                update(jobs).where(jobs.c.id == row.id, jobs.c.state == "pending")
                .values(state="running", started_at=now, updated_at=now, attempts=jobs.c.attempts + 1,
                        worker=worker or worker_id(), node=node, heartbeat_at=now if node else None)
            )
            if done.rowcount != 1:  # someone else took it
                return None
            return dict(c.execute(select(jobs).where(jobs.c.id == row.id)).one()._mapping)

    def update(self, job_id: int, **fields: Any) -> None:
        with self.engine.begin() as c:
            c.execute(update(jobs).where(jobs.c.id == job_id).values(updated_at=utcnow(), **fields))

    def finish(self, job_id: int, fields: Mapping[str, Any], results: Iterable[Metric],
               owner: str | None = None) -> bool:
        """Mark the job done and store its metrics, atomically. Returns whether it did.

        With ``owner`` (the ``worker`` that claimed it) the job is finished only if it is still running under
        that owner: a node that lost its lease (its heartbeat went stale and another node took the job over) must
        not commit a second result nor move the input.
        """
        now = utcnow()
        with self.engine.begin() as c:
            q = update(jobs).where(jobs.c.id == job_id)
            if owner is not None:
                q = q.where(jobs.c.state == "running", jobs.c.worker == owner)
            res = c.execute(q.values(state="done", finished_at=now, updated_at=now, error=None, error_kind=None,
                                     heartbeat_at=None, **fields))
            if res.rowcount != 1:
                return False
            c.execute(metrics.delete().where(metrics.c.job_id == job_id))
            rows = [dict(job_id=job_id, name=m.name, value=m.value, space=m.space, shave=m.shave,
                         reference=m.reference, protocol=m.protocol) for m in results]
            if rows:
                c.execute(metrics.insert(), rows)
            return True

    def _owned_update(self, job_id: int, owner: str | None, **values: Any) -> bool:
        """Update the job; with ``owner``, only while it is still running under that owner. Returns whether it did."""
        with self.engine.begin() as c:
            q = update(jobs).where(jobs.c.id == job_id)
            if owner is not None:
                q = q.where(jobs.c.state == "running", jobs.c.worker == owner)
            return c.execute(q.values(updated_at=utcnow(), **values)).rowcount == 1

    def fail(self, job_id: int, kind: str, error: str, fields: Mapping[str, Any] | None = None,
             owner: str | None = None) -> bool:
        """Mark the job failed. With ``owner``, only if that worker still holds it (see :meth:`finish`)."""
        return self._owned_update(job_id, owner, state="failed", error_kind=kind, error=error, finished_at=utcnow(),
                                  heartbeat_at=None, **(fields or {}))

    def retry_later(self, job_id: int, kind: str, error: str, at: dt.datetime, owner: str | None = None) -> bool:
        """Put the job back to pending until ``at``. With ``owner``, only if that worker still holds it."""
        return self._owned_update(job_id, owner, state="pending", error_kind=kind, error=error, next_attempt_at=at,
                                  heartbeat_at=None)

    def release(self, job_id: int, owner: str | None = None) -> None:
        """Give a running job back to the queue untouched (shutdown deadline): its attempt does not count.

        With ``owner``, only while that worker still holds it."""
        with self.engine.begin() as c:
            q = update(jobs).where(jobs.c.id == job_id, jobs.c.state == "running")
            if owner is not None:
                q = q.where(jobs.c.worker == owner)
            c.execute(q.values(state="pending", attempts=jobs.c.attempts - 1, updated_at=utcnow(), heartbeat_at=None,
                               node=None))

    def recover(self, stale_after: float | None = None, own_node: str | None = None, unowned: bool = True) -> int:
        """:meth:`recover_jobs`, returning how many jobs went back to pending."""
        return len(self.recover_jobs(stale_after, own_node, unowned))

    def recover_jobs(self, stale_after: float | None = None, own_node: str | None = None, unowned: bool = True,
                     now: dt.datetime | None = None, spare: Callable[[dict], bool] | None = None) -> list[dict]:
        """Running jobs whose owner is gone become pending again. Returns them (id, rel_path, node, worker,
        output_path).

        A running job is taken back when any of these holds:

        - ``unowned`` and it has no node: it was claimed outside the heartbeat protocol (``upscaled process``, a
          database from before nodes). The single-daemon behaviour at start-up.
        - its node is ``own_node``: call this before the node claims anything, so those are its previous life's.
        - ``stale_after`` is given and its heartbeat is older than that many seconds: its node died.

        A job for which ``spare(row)`` is true (row: id, rel_path, node, worker, output_path, source) stays.
        """
        now = now or utcnow()
        cond: list[ColumnElement[bool]] = []
        if unowned:
            cond.append(jobs.c.node.is_(None))
        if own_node is not None:
            cond.append(jobs.c.node == own_node)
        if stale_after is not None:
            cutoff = now - dt.timedelta(seconds=stale_after)
            cond.append(jobs.c.node.is_not(None) & ((jobs.c.heartbeat_at.is_(None)) | (jobs.c.heartbeat_at < cutoff)))
        if not cond:
            return []
        with self.engine.begin() as c:
            q = select(jobs.c.id, jobs.c.rel_path, jobs.c.node, jobs.c.worker, jobs.c.output_path, jobs.c.source) \
                .where(jobs.c.state == "running", or_(*cond))
            found = [dict(r._mapping) for r in c.execute(q.with_for_update(skip_locked=True)).all()]
            found = [f for f in found if spare is None or not spare(f)]
            if found:
                c.execute(update(jobs).where(jobs.c.id.in_([f["id"] for f in found]), jobs.c.state == "running")
                          .values(state="pending", updated_at=now, heartbeat_at=None, node=None))
            return found

    # --- nodes ----------------------------------------------------------------------------------------------------
    def heartbeat(self, node: str, info: Mapping[str, Any] | None = None, start: bool = False) -> dict | None:
        """Record that ``node`` is alive, and renew the lease of every job it runs. One transaction.

        ``start=True`` (re)registers the node with ``info`` (host, pid, device, workers, folders,
        rules_fingerprint) and a new ``started_at``. Returns the node's row as it was before (None if new), so a
        starting daemon can see whether the name is taken by a live one.
        """
        now = utcnow()
        with self.engine.begin() as c:
            before = c.execute(select(nodes).where(nodes.c.name == node).with_for_update()).first()
            values: dict[str, Any] = dict(heartbeat_at=now)
            if start:
                values |= dict(info or {}, started_at=now, stopped_at=None)
            if before is None:
                try:
                    with c.begin_nested():
                        c.execute(nodes.insert().values(
                            dict(name=node, host=socket.gethostname(), pid=os.getpid(), started_at=now) | values))
                except IntegrityError:  # two daemons with one name started together: the second one updates
                    c.execute(update(nodes).where(nodes.c.name == node).values(**values))
            else:
                c.execute(update(nodes).where(nodes.c.name == node).values(**values))
            c.execute(update(jobs).where(jobs.c.node == node, jobs.c.state == "running")
                      .values(heartbeat_at=now))
            return dict(before._mapping) if before is not None else None

    def node_stopped(self, node: str) -> None:
        """A clean shutdown: the node is no longer expected to heartbeat."""
        with self.engine.begin() as c:
            c.execute(update(nodes).where(nodes.c.name == node).values(stopped_at=utcnow()))

    def nodes(self, stale_after: float, window_s: float = 600.0, include_gone: bool = False) -> list[dict[str, Any]]:
        """The nodes with their state (live, stale, stopped), heartbeat age, current jobs and throughput.

        ``jobs_per_min`` counts the jobs a node finished in the last ``window_s`` seconds. Stopped and stale nodes
        are left out unless ``include_gone``.
        """
        now = utcnow()
        since = now - dt.timedelta(seconds=window_s)
        with self.engine.connect() as c:
            node_rows = [dict(r._mapping) for r in c.execute(select(nodes).order_by(nodes.c.name)).all()]
            running: dict[str, list[str]] = {}
            for r in c.execute(select(jobs.c.node, jobs.c.rel_path)
                               .where(jobs.c.state == "running", jobs.c.node.is_not(None)).order_by(jobs.c.id)):
                running.setdefault(r.node, []).append(r.rel_path)
            done_q = select(jobs.c.node, func.count().label("total"),
                            func.sum(case((jobs.c.finished_at >= since, 1), else_=0)).label("recent")) \
                .where(jobs.c.state == "done", jobs.c.node.is_not(None)).group_by(jobs.c.node)
            done = {r.node: (r.total, int(r.recent or 0)) for r in c.execute(done_q)}
        out = []
        for n in node_rows:
            age = (now - n["heartbeat_at"]).total_seconds()
            state = "stopped" if n["stopped_at"] is not None else "stale" if age > stale_after else "live"
            if state != "live" and not include_gone:
                continue
            total, recent = done.get(n["name"], (0, 0))
            cur = running.get(n["name"], [])
            out.append(dict(node=n["name"], state=state, host=n["host"], pid=n["pid"], heartbeat_age_s=round(age, 1),
                            started_at=n["started_at"], device=n["device"], workers=n["workers"],
                            folders=n["folders"] or "(all)", running=len(cur), current=", ".join(cur),
                            done=total, jobs_per_min=round(recent * 60.0 / window_s, 2),
                            rules_fingerprint=n["rules_fingerprint"]))
        return out

    # --- reads --------------------------------------------------------------------------------------------------
    def get(self, job_id: int) -> dict | None:
        with self.engine.connect() as c:
            row = c.execute(select(jobs).where(jobs.c.id == job_id)).first()
            return dict(row._mapping) if row else None

    def by_key(self, sha: str, fingerprint: str) -> dict | None:
        with self.engine.connect() as c:
            row = c.execute(select(jobs).where(jobs.c.content_sha256 == sha,
                                               jobs.c.rule_fingerprint == fingerprint)).first()
            return dict(row._mapping) if row else None

    def owns_output(self, path: str) -> int | None:
        """The id of the job whose output is ``path``, if any."""
        with self.engine.connect() as c:
            return c.execute(select(jobs.c.id).where(jobs.c.output_path == path)).scalar()

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as c:
            rows = c.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        return {s: 0 for s in STATES} | {r[0]: r[1] for r in rows}

    def metrics_of(self, job_id: int) -> dict[str, float]:
        with self.engine.connect() as c:
            rows = c.execute(select(metrics.c.name, metrics.c.value).where(metrics.c.job_id == job_id)).all()
        return {r.name: r.value for r in rows}
