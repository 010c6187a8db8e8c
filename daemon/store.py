"""The durable job store: :class:`SqlStore`, the :class:`~daemon.jobs.JobStore` on SQLAlchemy 2 Core.

SQLite (WAL, a busy timeout, full sync) by default, or PostgreSQL for several daemons on one inbox (see
docs/scaling.md). Every method is one committed transaction; the transitions and their meaning are documented in
:mod:`daemon.jobs`. Claims are exclusive: on PostgreSQL the candidate rows are locked with ``FOR UPDATE SKIP
LOCKED``, so concurrent workers take different jobs without waiting for each other; on SQLite, ``BEGIN IMMEDIATE``
serialises writers. A compare-and-set on the state is the last guard on both.

Times are naive UTC from the injected clock, stored as ``YYYY-MM-DD HH:MM:SS.ffffff`` text on SQLite, so
``datetime('now')`` comparisons work in ad-hoc SQL. The schema is managed by Alembic (``daemon/migrations``); opening
a store for writing upgrades it to the newest revision; readers (``history``, ``query``, ``web``) open it read-only
with :func:`make_engine` and never migrate it.

Each daemon is a *node* with a row in ``nodes`` that it heartbeats (:class:`~daemon.jobs.NodeStore`); a job it
claims records the node and the worker (host:pid/thread) and carries the node's heartbeat in ``jobs.heartbeat_at``.
A running job whose heartbeat is older than the stale timeout belongs to a dead node and goes back to pending
(:meth:`SqlStore.recover`). Leases (``jobs.heartbeat_at``, ``nodes.heartbeat_at``) are stamped and compared on the
*lease clock*: on PostgreSQL the server's own ``now()``, inside the statement, so hosts whose clocks disagree still
agree on which lease is stale; on SQLite, which is one host's file, that host's clock (the store's ``clock``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Interval,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    create_engine,
    event,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from daemon import logs
from daemon.config import Rule
from daemon.errors import NodeInUseError
from daemon.fsops import FileId, display, text_form
from daemon.jobs import (
    STAGES,
    STATES,
    Beat,
    Clock,
    Finished,
    Job,
    JobSpec,
    NodeInfo,
    NodeRow,
    NodeStatus,
    OutputPlanner,
    Registered,
    name_columns,
    recovery,
    rel_from_columns,
    utcnow,
    worker_id,
)
from daemon.metrics import Metric
from daemon.migrations import SUMMARY_MEANS, SUMMARY_PARTS, VIEWS_PRUNED

_JOB_FIELDS = set(Job.__dataclass_fields__)
metadata = MetaData()

# One row per `upscaled bench` run; its jobs (source "bench") point back to it through jobs.bench_run_id.
bench_runs = Table(
    "bench_runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("started_at", DateTime, nullable=False),
    Column("settings", Text, nullable=False),  # JSON: dataset, models, scales, downscale, device, ...
    Column("report_path", Text),  # the HTML report `--report` wrote, if any
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
    Column("rel_path_raw", LargeBinary),  # the exact bytes of a name that is not UTF-8 (rel_path: printable form)
    Column("input_path", Text, nullable=False),
    Column("input_size", Integer),
    Column("input_dev", BigInteger),  # device and inode when registered: a file replaced later is not this input
    Column("input_ino", BigInteger),
    Column("frames", Integer),  # frames of an animated input
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
    Column("metrics_state", String(16)),  # pending between the done commit and the metrics commit; done; lost
    # Taken back after its worker died (never after a clean stop); of those, while it was alone in flight; and whether
    # its current claim runs alone. A recovered job runs alone; `max_recoveries` deaths alone make it "poison".
    Column("recoveries", Integer, nullable=False, default=0, server_default="0"),
    Column("alone_deaths", Integer, nullable=False, default=0, server_default="0"),
    Column("alone", Boolean, nullable=False, default=False, server_default=false()),
    UniqueConstraint("content_sha256", "rule_fingerprint", name="uq_jobs_content_rule"),
    Index("ix_jobs_state", "state", "next_attempt_at"),
    Index("ix_jobs_model", "model_id"),
    Index("ix_jobs_created", "created_at"),
    Index("ix_jobs_node", "node", "state"),
    Index("ix_jobs_output", "output_path"),
    Index("ix_jobs_metrics", "metrics_state", "id"),  # the metrics still to come, read back oldest first
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
    Column("clock_skew_s", Float),  # its host's clock minus the database's at its last heartbeat (NULL: unmeasured)
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

# One row per run of an on_done / on_failed hook.
hook_runs = Table(
    "hook_runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("event", String(16), nullable=False),
    Column("ok", Boolean, nullable=False),
    Column("detail", Text),
    Column("at", DateTime, nullable=False),
    Index("ix_hook_runs_job", "job_id"),
)

_NODE_INFO = [f.name for f in fields(NodeInfo)]  # the nodes columns a node's NodeInfo fills

meta = Table("meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text))

# What `upscaled db prune` kept of the jobs it deleted: the counts and sums behind model_summary's means, which adds
# them to the live rows'.
model_summary_pruned = Table(
    "model_summary_pruned",
    metadata,
    Column("model_id", String(64), primary_key=True),
    Column("scale", Float, primary_key=True),
    Column("mode", String(16), primary_key=True),
    Column("jobs", Integer, nullable=False),
    Column("done", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    *[c for k in SUMMARY_MEANS for c in (Column(f"{k}_sum", Float), Column(f"{k}_n", Integer))],
)

# The views as the migrations create them (revision 0007; a later revision that changes a view updates this too).
VIEWS = VIEWS_PRUNED


# A daemon statement that runs longer than this fails (PostgreSQL's statement_timeout) instead of hanging its thread.
# Below the default stale_seconds (30), so a stuck heartbeat is an error in the log before the node's leases lapse.
STATEMENT_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 10  # libpq's connect_timeout: a server that does not answer at all


def make_engine(url: str, readonly: bool = False, statement_timeout_s: float | None = STATEMENT_TIMEOUT_S) -> Engine:
    """An engine with the settings the service relies on.

    SQLite: WAL, a 30 s busy timeout, full sync (a committed job survives a power cut), foreign keys, and
    ``BEGIN IMMEDIATE`` for writers. ``readonly``: SQLite opens the file with ``mode=ro`` and ``query_only``;
    PostgreSQL sessions start with ``default_transaction_read_only = on`` (a reader's own ``COMMIT`` cannot turn it
    off), so a reader (``query``, ``web``) can change nothing whatever SQL it is handed. A deployment gives readers
    a role with SELECT only as well (see docs/security.md).

    PostgreSQL writers' sessions start with ``statement_timeout`` = ``statement_timeout_s`` (None: none), so a
    stuck server or a lock held elsewhere fails one step of the daemon instead of hanging a thread; readers run
    without one (an analysis may be long). Every PostgreSQL connection gives up after ``CONNECT_TIMEOUT_S`` when the
    server does not answer. SQLite has no server to get stuck; its busy timeout bounds the wait for the write lock.

    Raises:
        FileNotFoundError: ``readonly`` on a SQLite file that does not exist yet.
    """
    connect_args: dict[str, Any] = {}
    if url.startswith("sqlite:///") and ":memory:" not in url:
        path = Path(url[len("sqlite:///") :])
        if readonly:
            if not path.exists():
                raise FileNotFoundError(f"database {path} does not exist yet")
            url = f"sqlite:///file:{path}?mode=ro&uri=true"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("sqlite"):
        connect_args["timeout"] = 30
    else:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
        if readonly:
            connect_args["options"] = "-c default_transaction_read_only=on"
        elif statement_timeout_s is not None:
            connect_args["options"] = f"-c statement_timeout={round(statement_timeout_s * 1000)}"
    # pool_pre_ping: a PostgreSQL server restart or a dropped NAT entry must not fail the next claim.
    engine = create_engine(url, connect_args=connect_args, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            if not readonly:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")  # a committed job survives a power cut
                # SQLite's page cache is per connection (2 MB by default), and fills as the file grows: 512 kB each
                # holds what a worker touches again (the newest rows and the index tops), and bounds the daemon's
                # share early (docs/performance.md, memory). Pages beyond it come from the OS page cache.
                cur.execute("PRAGMA cache_size=-512")
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


# What a reader's role must not be able to do on PostgreSQL, as one query over the session's own role: be a superuser,
# signal the daemon's sessions (a member of the role that owns the jobs table, or of pg_signal_backend), or take an
# advisory lock (which the claims' output reservations and the migrations use).
_READER_POWERS = text(r"""
SELECT r.rolsuper AS superuser,
  pg_has_role(current_user, 'pg_signal_backend', 'MEMBER') AS signal_any,
  COALESCE((SELECT pg_has_role(current_user, t.tableowner, 'MEMBER') FROM pg_tables t
            WHERE t.tablename = 'jobs' AND t.schemaname = current_schema()), false) AS signal_daemon,
  ARRAY(SELECT p.oid::regprocedure::text FROM pg_proc p
        WHERE p.proname LIKE 'pg\_%advisory%lock%' AND p.proname NOT LIKE '%unlock%'
          AND has_function_privilege(p.oid, 'EXECUTE') ORDER BY 1) AS locks
FROM pg_roles r WHERE r.rolname = current_user""")


def reader_powers(c: Connection) -> list[str]:
    """What the session's PostgreSQL role can do that a reader must not (empty: a safe reader; always empty on
    SQLite, which has neither advisory locks nor other sessions to signal). See docs/security.md."""
    if c.dialect.name != "postgresql":
        return []
    r = c.execute(_READER_POWERS).one()
    out = []
    if r.superuser:
        out.append("is a superuser")
    if r.signal_any or r.signal_daemon:
        out.append("can signal the daemon's sessions (pg_terminate_backend)")
    if r.locks:
        out.append(f"can take advisory locks ({', '.join(r.locks)})")
    return out


def safe_url(url: str) -> str:
    """The database URL with its password masked, for logs and messages (never log the password)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: say nothing of what it holds
        return "<unparsable database URL>"


@dataclass(frozen=True)
class Pruned:
    """What :meth:`SqlStore.prune` deleted: rows per table."""

    jobs: int
    metrics: int
    hook_runs: int
    bench_runs: int
    nodes: int


def _insert(dialect: str):  # noqa: ANN202 - the dialect's INSERT with ON CONFLICT
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    return insert


class SqlStore:
    """Jobs, metrics and nodes in a SQL database. Implements :class:`daemon.jobs.DaemonStore`."""

    def __init__(
        self,
        url: str,
        upgrade: bool = True,
        clock: Clock = utcnow,
        readonly: bool = False,
        lease_clock: Clock | None = None,
        statement_timeout_s: float | None = STATEMENT_TIMEOUT_S,
    ) -> None:
        """Open the database at ``url`` and, unless ``upgrade`` is False (or ``readonly``), migrate it to the newest
        schema. A ``readonly`` store reads (``nodes``, ``get``, ``counts``) and can change nothing.

        ``clock`` stamps the history (created, started, finished). ``lease_clock`` stamps and ages leases and node
        heartbeats; by default it is the database's own clock: PostgreSQL's ``now()``, shared by every node, or on
        SQLite (one host) ``clock``. A test passes a fake one to age leases without waiting.
        ``statement_timeout_s``: see :func:`make_engine`.

        Raises:
            sqlalchemy.exc.OperationalError: the database cannot be reached or written.
            FileNotFoundError: ``readonly`` on a SQLite file that does not exist yet.
        """
        self.url = url
        self.clock = clock
        self.engine = make_engine(url, readonly=readonly, statement_timeout_s=statement_timeout_s)
        self._server_time = lease_clock is None and self.engine.dialect.name == "postgresql"
        self.lease_clock = lease_clock or clock
        upgrade = upgrade and not readonly
        self._rules: dict[str, Rule] = {}  # rule_json -> Rule: a queue holds few distinct rules
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

    # --- the lease clock ---------------------------------------------------------------------------------------------
    def _lease_now(self) -> ColumnElement[dt.datetime]:
        """Now on the lease clock, for a statement: the server's transaction time (naive UTC) on PostgreSQL, so no
        host's clock enters a lease; else the lease clock's reading, bound as a parameter."""
        if self._server_time:
            return func.timezone("UTC", func.now(), type_=DateTime())
        return literal(self.lease_clock(), DateTime())

    def _lease_cutoff(self, seconds: float) -> ColumnElement[dt.datetime]:
        """The lease clock ``seconds`` ago: a lease stamped before it is stale."""
        if self._server_time:
            return self._lease_now() - literal(dt.timedelta(seconds=seconds), Interval())
        return literal(self.lease_clock() - dt.timedelta(seconds=seconds), DateTime())

    def _lease_time(self, c: Connection) -> dt.datetime:
        """Now on the lease clock, as a value (one round trip on PostgreSQL)."""
        return c.execute(select(self._lease_now())).scalar_one() if self._server_time else self.lease_clock()

    # --- rows <-> jobs -----------------------------------------------------------------------------------------------
    def _rule(self, rule_json: str | None, m: Mapping[str, Any]) -> Rule:
        rule = self._rules.get(rule_json or "")
        if rule is None:
            try:
                rule = Rule.model_validate_json(rule_json or "{}")
                if rule.model != m["model_id"]:  # "{}": a row from before rules were recorded
                    raise ValueError(rule_json)
            except ValueError as exc:  # a row written by an older version: what its columns say
                logs.get().warning(
                    "job.rule_unreadable",
                    job=m["id"],
                    error=str(exc).splitlines()[0],
                    note="read from the job's columns: model, scale, outscale, mode, folder",
                )
                rule = Rule.model_construct(
                    model=m["model_id"], scale=m["scale"], outscale=m["outscale"], mode=m["mode"], folder=m["folder"]
                )
            self._rules[rule_json or ""] = rule
        return rule

    def _job(self, r: Any) -> Job:
        m = r._mapping
        return Job(
            id=m["id"],
            sha=m["content_sha256"],
            fingerprint=m["rule_fingerprint"],
            state=m["state"],
            rule=self._rule(m["rule_json"], m),
            rel=rel_from_columns(m["rel_path"], m["rel_path_raw"]),
            input_path=m["input_path"],
            source=m["source"],
            folder=m["folder"],
            attempts=m["attempts"],
            worker=m["worker"],
            node=m["node"],
            input_size=m["input_size"],
            input_id=None if m["input_dev"] is None else FileId(m["input_dev"], m["input_ino"]),
            input_format=m["input_format"],
            input_width=m["input_width"],
            input_height=m["input_height"],
            frames=m["frames"] or 1,
            recoveries=m["recoveries"] or 0,
            alone_deaths=m["alone_deaths"] or 0,
            alone=bool(m["alone"]),
            output_path=m["output_path"],
            input_moved_to=m["input_moved_to"],
            error_kind=m["error_kind"],
            error=m["error"],
            metrics_state=m["metrics_state"],
            created_at=m["created_at"],
            started_at=m["started_at"],
            finished_at=m["finished_at"],
            next_attempt_at=m["next_attempt_at"],
            bench_run_id=m["bench_run_id"],
        )

    @staticmethod
    def _columns(spec: JobSpec) -> dict[str, Any]:
        rel_path, raw = name_columns(spec.rel)
        rule = spec.rule
        return dict(
            source=spec.source,
            folder=rule.folder if spec.folder is None else spec.folder,
            rel_path=rel_path,
            rel_path_raw=raw,
            input_path=text_form(spec.input_path),
            input_size=spec.input_size,
            input_dev=None if spec.input_id is None else spec.input_id.dev,
            input_ino=None if spec.input_id is None else spec.input_id.ino,
            input_format=spec.input_format,
            input_width=spec.input_width,
            input_height=spec.input_height,
            frames=spec.frames,
            model_id=rule.model,
            scale=rule.scale,
            outscale=rule.final_scale,
            mode=rule.mode,
            rule_json=rule.model_dump_json(),
            bench_run_id=spec.bench_run_id,
        )

    # --- transitions -------------------------------------------------------------------------------------------------
    def register(self, specs: Sequence[JobSpec], node: str | None = None) -> list[Registered]:
        """Create the job for each spec, or find the one that exists. Idempotent, across processes too.

        A spec with a ``failure`` is created already *running* (claimed by this process, owned by ``node``), so no
        worker ever sees it: the caller fails it right away.
        """
        now = self.clock()
        out = []
        # One statement, its values bound per row: building ``insert().values(**row)`` anew for each file spent most
        # of a burst's intake in SQLAlchemy's compiler (docs/performance.md, "Constants from measurements").
        stmt = _insert(self.engine.dialect.name)(jobs)
        if hasattr(stmt, "on_conflict_do_nothing"):
            stmt = stmt.on_conflict_do_nothing(index_elements=["content_sha256", "rule_fingerprint"])
        stmt = stmt.returning(*jobs.c)
        with self.engine.begin() as c:
            # A failing spec is created running, under a lease when it has a node: stamped on the lease clock.
            lease = self._lease_time(c) if node and any(sp.failure is not None for sp in specs) else None
            for spec in specs:
                sha, fp = spec.key()
                failing = spec.failure is not None
                values = dict(
                    self._columns(spec),
                    content_sha256=sha,
                    rule_fingerprint=fp,
                    state="running" if failing else "pending",
                    attempts=1 if failing else 0,
                    created_at=now,
                    updated_at=now,
                )
                if failing:
                    values |= dict(started_at=now, worker=worker_id(), node=node, heartbeat_at=lease)
                row = c.execute(stmt, values).first()
                if row is not None:
                    out.append(Registered(self._job(row), True))
                    continue
                row = c.execute(select(jobs).where(jobs.c.content_sha256 == sha, jobs.c.rule_fingerprint == fp)).one()
                out.append(Registered(self._job(row), False))
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
        """Move up to ``limit`` due pending jobs (oldest first, or just ``job_id``) to running under ``worker``,
        and reserve each one's output path with ``plan`` (see :data:`daemon.jobs.OutputPlanner`). Returns them.

        ``node`` records the claiming daemon (it must then heartbeat); ``folders`` limits the claim to jobs of
        those rule folders; ``source`` to jobs of that source (a daemon takes ``watch`` jobs only: a ``cli`` or
        ``bench`` job's input is not the daemon's to move). A job taken back after its worker died (a *suspect*)
        is claimed only ``alone``: one job, suspects first, marked as alone in flight; a claim that is not alone
        never takes one.
        """
        now = self.clock()
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
            order: list[Any] = [jobs.c.id]
            if alone:
                limit, order = 1, [case((jobs.c.recoveries > 0, 0), else_=1), jobs.c.id]
            elif job_id is None:
                q = q.where(jobs.c.recoveries == 0)
            # SQLite's compiler renders no FOR UPDATE: there the write lock of BEGIN IMMEDIATE does the same job.
            ids = [r.id for r in c.execute(q.order_by(*order).limit(limit).with_for_update(skip_locked=True))]
            if not ids:
                return []
            # One UPDATE for the lot; a row someone else took meanwhile is no longer pending and is left out.
            rows = c.execute(
                update(jobs)
                .where(jobs.c.id.in_(ids), jobs.c.state == "pending")
                .values(
                    state="running",
                    started_at=now,
                    updated_at=now,
                    attempts=jobs.c.attempts + 1,
                    worker=worker,
                    node=node,
                    heartbeat_at=self._lease_now() if node else None,
                    alone=alone,
                )
                .returning(*jobs.c)
            ).all()
            out, planned = [], {}
            for row in sorted(rows, key=lambda r: r.id):
                job = self._job(row)
                if plan is not None and job.output_path is None:
                    # Taken: by another job's row, or by a job earlier in this very claim.
                    def taken(p: str, me: int = job.id) -> bool:
                        return p in planned or self._taken(c, p, me)

                    path = plan(job, taken)
                    planned[path] = job.id
                    job = replace(job, output_path=path)
                out.append(job)
            if planned:
                c.execute(
                    update(jobs).where(jobs.c.id == bindparam("jid")).values(output_path=bindparam("path")),
                    [{"jid": jid, "path": path} for path, jid in planned.items()],
                )
            return out

    def _taken(self, c: Connection, path: str, me: int) -> bool:
        """Whether output ``path`` is not free for job ``me``: a job other than ``me`` owns it, or (PostgreSQL)
        another session holds its advisory lock, and the planner goes on to the next name.

        On PostgreSQL a transaction-scoped advisory lock on the path makes check-then-reserve atomic across nodes
        (SQLite's write lock already does). It is only *tried*: a claim never waits for a lock another session holds,
        be it a concurrent claim reserving that very name (which would take it anyway) or a stray reader's lock.
        """
        if self.engine.dialect.name == "postgresql":
            got = c.execute(text("SELECT pg_try_advisory_xact_lock(hashtextextended(:p, 0))"), {"p": path}).scalar()
            if not got:
                return True
        owner = c.execute(select(jobs.c.id).where(jobs.c.output_path == path, jobs.c.id != me).limit(1)).scalar()
        return owner is not None

    def _owned(self, q: Any, owner: str | None) -> Any:
        return q if owner is None else q.where(jobs.c.state == "running", jobs.c.worker == owner)

    def finish(self, results: Sequence[Finished]) -> list[bool]:
        """Mark jobs done with their fields, metrics and planned archive path: one transaction for all of them
        (a group commit while the queue is deep). Returns, per job, whether it was still owned and is now done."""
        now = self.clock()
        out = []
        # Two statements for all rows (with and without an owner to check), the values bound per row (see register).
        anyone = update(jobs).where(jobs.c.id == bindparam("jid"))
        owned = anyone.where(jobs.c.state == "running", jobs.c.worker == bindparam("owner"))
        with self.engine.begin() as c:
            for r in results:
                moved = None if r.archive_path is None else text_form(r.archive_path)
                values = dict(
                    r.fields,
                    state="done",
                    finished_at=now,
                    updated_at=now,
                    error=None,
                    error_kind=None,
                    heartbeat_at=None,
                    input_moved_to=moved,
                    metrics_state="pending" if r.metrics_pending else None,
                    jid=r.job_id,
                )
                if r.owner is not None:
                    values["owner"] = r.owner
                res = c.execute(anyone if r.owner is None else owned, values)
                ok = res.rowcount == 1
                out.append(ok)
                if ok:
                    c.execute(metrics.delete().where(metrics.c.job_id == r.job_id))
                    self._insert_metrics(c, r.job_id, r.metrics)
        return out

    @staticmethod
    def _insert_metrics(c: Connection, job_id: int, results: Sequence[Metric]) -> None:
        rows = [
            dict(
                job_id=job_id,
                name=m.name,
                value=m.value,
                space=m.space,
                shave=m.shave,
                reference=m.reference,
                protocol=m.protocol,
            )
            for m in results
        ]
        if rows:
            c.execute(metrics.insert(), rows)

    def record_metrics(self, job_id: int, results: Sequence[Metric], state: str = "done") -> None:
        """The metrics of a done job, computed after its commit; ``state`` ``lost`` when they cannot be."""
        with self.engine.begin() as c:
            c.execute(metrics.delete().where(metrics.c.job_id == job_id))
            self._insert_metrics(c, job_id, results)
            c.execute(update(jobs).where(jobs.c.id == job_id).values(metrics_state=state, updated_at=self.clock()))

    def _update(self, job_id: int, owner: str | None, **values: Any) -> bool:
        with self.engine.begin() as c:
            q = self._owned(update(jobs).where(jobs.c.id == job_id), owner)
            return c.execute(q.values(updated_at=self.clock(), **values)).rowcount == 1

    def fail(
        self, job_id: int, kind: str, error: str, owner: str | None = None, fields: Mapping[str, Any] | None = None
    ) -> bool:
        """Mark the job failed. With ``owner``, only if that worker still holds it."""
        return self._update(
            job_id,
            owner,
            state="failed",
            error_kind=kind,
            error=error,
            finished_at=self.clock(),
            heartbeat_at=None,
            **(fields or {}),
        )

    def retry_later(self, job_id: int, kind: str, error: str, at: dt.datetime, owner: str | None = None) -> bool:
        """Put the job back to pending until ``at``. With ``owner``, only if that worker still holds it."""
        return self._update(
            job_id, owner, state="pending", error_kind=kind, error=error, next_attempt_at=at, heartbeat_at=None
        )

    def release(self, job_id: int, owner: str | None = None) -> bool:
        """Give a running job back to the queue untouched (the shutdown deadline): its attempt does not count."""
        with self.engine.begin() as c:
            q = update(jobs).where(jobs.c.id == job_id, jobs.c.state == "running")
            if owner is not None:
                q = q.where(jobs.c.worker == owner)
            return (
                c.execute(
                    q.values(
                        state="pending",
                        attempts=jobs.c.attempts - 1,
                        updated_at=self.clock(),
                        heartbeat_at=None,
                        node=None,
                    )
                ).rowcount
                == 1
            )

    def record_move(self, job_id: int, dest: str | None) -> None:
        """Where the input went (archive/ or failed/), or None: deleted, or left where it was. A path that is not
        UTF-8 is recorded in its printable form."""
        self._update(job_id, None, input_moved_to=None if dest is None else text_form(dest))

    def requeue(self, job_id: int, rel: PurePosixPath, input_path: str, input_id: FileId | None) -> None:
        """A failed input dropped again: the user asks for another try, from scratch."""
        rel_path, raw = name_columns(rel)
        self._update(
            job_id,
            None,
            state="pending",
            rel_path=rel_path,
            rel_path_raw=raw,
            input_path=text_form(input_path),
            input_dev=None if input_id is None else input_id.dev,
            input_ino=None if input_id is None else input_id.ino,
            input_moved_to=None,
            next_attempt_at=None,
            attempts=0,
            output_path=None,
            error=None,
            error_kind=None,
        )

    def rename(self, job_id: int, rel: PurePosixPath, input_path: str, input_id: FileId | None) -> None:
        """A queued input was renamed while it waited: follow it."""
        rel_path, raw = name_columns(rel)
        self._update(
            job_id,
            None,
            rel_path=rel_path,
            rel_path_raw=raw,
            input_path=text_form(input_path),
            input_dev=None if input_id is None else input_id.dev,
            input_ino=None if input_id is None else input_id.ino,
        )

    def progress(self, job_id: int, text_: str) -> None:
        """The running job's last progress (``tile 3/12``), for ``history`` and the web view."""
        with self.engine.begin() as c:
            c.execute(update(jobs).where(jobs.c.id == job_id).values(progress=text_))

    def recover(
        self,
        stale_after: float | None = None,
        own_node: str | None = None,
        unowned: bool = False,
        spare: Callable[[Job], bool] | None = None,
        max_recoveries: int | None = None,
    ) -> list[Job]:
        """Running jobs whose owner is gone become pending again, counted: each one's ``recoveries`` goes up, and
        its ``alone_deaths`` too when it was the only job in flight (its claim was ``alone``). One that reaches
        ``max_recoveries`` deaths alone fails as ``poison`` instead, with its history in the error: the caller
        quarantines its input. Returns them as they are now.

        A running job is taken back when any of these holds:

        - ``unowned`` and it has no node: it was claimed outside the heartbeat protocol (``upscaled process``, a
          database from before nodes);
        - its node is ``own_node``: call this before the node claims anything, so those are its previous life's;
        - ``stale_after`` is given and its heartbeat is older than that many seconds: its node died.

        A job for which ``spare(job)`` is true stays. A clean stop never comes here: it gives its jobs back with
        :meth:`release`, which counts nothing.
        """
        now = self.clock()
        cond: list[ColumnElement[bool]] = []
        if unowned:
            cond.append(jobs.c.node.is_(None))
        if own_node is not None:
            cond.append(jobs.c.node == own_node)
        if stale_after is not None:
            cutoff = self._lease_cutoff(stale_after)
            cond.append(jobs.c.node.is_not(None) & ((jobs.c.heartbeat_at.is_(None)) | (jobs.c.heartbeat_at < cutoff)))
        if not cond:
            return []
        with self.engine.begin() as c:
            q = select(jobs).where(jobs.c.state == "running", or_(*cond))
            found = [self._job(r) for r in c.execute(q.with_for_update(skip_locked=True)).all()]
            found = [j for j in found if spare is None or not spare(j)]
            out = []
            for job in found:
                values = recovery(job, now, max_recoveries)
                c.execute(
                    update(jobs)
                    .where(jobs.c.id == job.id, jobs.c.state == "running")
                    .values(updated_at=now, heartbeat_at=None, node=None, **values)
                )
                out.append(replace(job, **{k: v for k, v in values.items() if k in _JOB_FIELDS}))
            return out

    def suspects(self, folders: Iterable[str] | None = None, source: str | None = None) -> int:
        """Pending jobs taken back after their worker died, due now: each is to be claimed ``alone``."""
        with self.engine.connect() as c:
            q = select(func.count()).select_from(jobs).where(jobs.c.state == "pending", jobs.c.recoveries > 0)
            q = q.where((jobs.c.next_attempt_at.is_(None)) | (jobs.c.next_attempt_at <= self.clock()))
            if folders is not None:
                q = q.where(jobs.c.folder.in_(list(folders)))
            if source is not None:
                q = q.where(jobs.c.source == source)
            return int(c.execute(q).scalar() or 0)

    def metrics_pending(self, node: str | None, stale_after: float, limit: int | None = None) -> list[Job]:
        """Done jobs whose metrics are not recorded yet (still to come, or a crash between the two commits) that
        ``node`` should compute, oldest first, at most ``limit``: its own, and those of nodes that are gone (no
        heartbeat for ``stale_after`` seconds)."""
        cutoff = self._lease_cutoff(stale_after)
        with self.engine.connect() as c:
            gone = select(nodes.c.name).where(or_(nodes.c.heartbeat_at < cutoff, nodes.c.stopped_at.is_not(None)))
            q = select(jobs).where(jobs.c.metrics_state == "pending", jobs.c.state == "done", jobs.c.source == "watch")
            if node is not None:
                q = q.where(or_(jobs.c.node == node, jobs.c.node.is_(None), jobs.c.node.in_(gone)))
            return [self._job(r) for r in c.execute(q.order_by(jobs.c.id).limit(limit))]

    def record_hook(self, job_id: int, event_: str, ok: bool, detail: str) -> None:
        with self.engine.begin() as c:
            c.execute(
                hook_runs.insert().values(job_id=job_id, event=event_, ok=ok, detail=detail[:4000], at=self.clock())
            )

    # --- nodes -------------------------------------------------------------------------------------------------------
    def _node_row(self, r: Any, now: dt.datetime) -> NodeRow:
        m = r._mapping
        info = NodeInfo(**{k: m[k] for k in _NODE_INFO})
        age = (now - m["heartbeat_at"]).total_seconds()
        return NodeRow(m["name"], info, m["started_at"], m["heartbeat_at"], m["stopped_at"], age, m["clock_skew_s"])

    def join(self, node: str, info: NodeInfo, in_use: Callable[[NodeRow], bool]) -> NodeRow | None:
        """Enter ``node`` (see :meth:`daemon.jobs.NodeStore.join`): a new row, or the old one taken over.

        Raises:
            daemon.errors.NodeInUseError: ``in_use`` says the old row's daemon is alive, or another daemon entered
                the same new name in the same instant; nothing is changed.
        """
        with self.engine.begin() as c:
            now = self._lease_time(c)
            old = c.execute(select(nodes).where(nodes.c.name == node).with_for_update()).first()
            before = None if old is None else self._node_row(old, now)
            if before is not None and in_use(before):
                raise NodeInUseError(node, before.info.host, before.info.pid)
            skew, _ = self._skew(c)
            values = dict(asdict(info), started_at=now, heartbeat_at=now, stopped_at=None, clock_skew_s=skew)
            if before is not None:
                c.execute(update(nodes).where(nodes.c.name == node).values(**values))
                return before
            # No row to lock: a daemon entering the same name concurrently loses here instead of sharing it.
            stmt = _insert(self.engine.dialect.name)(nodes).values(name=node, **values)
            if c.execute(stmt.on_conflict_do_nothing(index_elements=["name"])).rowcount == 0:
                other = c.execute(select(nodes.c.host, nodes.c.pid).where(nodes.c.name == node)).one()
                raise NodeInUseError(node, other.host, other.pid)
            return None

    def heartbeat(self, node: str) -> Beat:
        """Renew ``node``'s row and its running jobs' leases on the lease clock, and measure this host's skew
        against that clock (see :meth:`daemon.jobs.NodeStore.heartbeat`). One transaction.

        Raises:
            KeyError: ``node`` has no row: it never joined.
        """
        with self.engine.begin() as c:
            skew, uncertainty = self._skew(c)
            at = c.execute(
                update(nodes)
                .where(nodes.c.name == node)
                .values(heartbeat_at=self._lease_now(), clock_skew_s=skew)
                .returning(nodes.c.heartbeat_at)
            ).scalar()
            if at is None:
                raise KeyError(f"node {node!r} has not joined")
            # SKIP LOCKED: a job whose row a finish (or a recovery) holds right now is about to change anyway, and
            # waiting for it while that finish waits for a row this renewal holds is a deadlock that fails the finish.
            mine = select(jobs.c.id).where(jobs.c.node == node, jobs.c.state == "running")
            c.execute(update(jobs).where(jobs.c.id.in_(mine.with_for_update(skip_locked=True))).values(heartbeat_at=at))
            return Beat(at, skew, uncertainty)

    def _skew(self, c: Connection) -> tuple[float, float]:
        """(this host's clock minus the database's, half the round trip that measured it), in seconds; (0, 0) where
        the lease clock is this host's own."""
        if not self._server_time:
            return 0.0, 0.0
        # clock_timestamp(), not now(): the server's time while the statement runs, between t0 and t1.
        t0 = self.clock()
        server = c.execute(select(func.timezone("UTC", func.clock_timestamp(), type_=DateTime()))).scalar_one()
        t1 = self.clock()
        half = (t1 - t0) / 2
        return (t0 + half - server).total_seconds(), half.total_seconds()

    def leave(self, node: str) -> None:
        """A clean shutdown: the node is no longer expected to heartbeat."""
        with self.engine.begin() as c:
            c.execute(update(nodes).where(nodes.c.name == node).values(stopped_at=self._lease_now()))

    def nodes(self, stale_after: float, window_s: float = 600.0, include_gone: bool = False) -> list[NodeStatus]:
        """The nodes with their state (live, stale, stopped), lease age, current jobs and throughput (see
        :meth:`daemon.jobs.NodeStore.nodes`)."""
        since = self.clock() - dt.timedelta(seconds=window_s)  # finished_at is stamped by the store's clock
        with self.engine.connect() as c:
            now = self._lease_time(c)
            rows = [self._node_row(r, now) for r in c.execute(select(nodes).order_by(nodes.c.name))]
            running: dict[str, list[str]] = {}
            for r in c.execute(
                select(jobs.c.node, jobs.c.rel_path, jobs.c.rel_path_raw)
                .where(jobs.c.state == "running", jobs.c.node.is_not(None))
                .order_by(jobs.c.id)
            ):
                running.setdefault(r.node, []).append(display(str(rel_from_columns(r.rel_path, r.rel_path_raw))))
            done_q = (
                select(
                    jobs.c.node,
                    func.count().label("total"),
                    func.sum(case((jobs.c.finished_at >= since, 1), else_=0)).label("recent"),
                )
                .where(jobs.c.state == "done", jobs.c.node.is_not(None))
                .group_by(jobs.c.node)
            )
            done = {r.node: (r.total, int(r.recent or 0)) for r in c.execute(done_q)}
        out = []
        for row in rows:
            state = row.state(stale_after)
            if state != "live" and not include_gone:
                continue
            total, recent = done.get(row.name, (0, 0))
            out.append(
                NodeStatus(row, state, tuple(running.get(row.name, ())), total, round(recent * 60.0 / window_s, 2))
            )
        return out

    # --- housekeeping ------------------------------------------------------------------------------------------------
    def prune(self, before: dt.datetime, keep_summary: bool = True, batch: int = 2000) -> Pruned:
        """Delete the history of the jobs that ended before ``before``: done and failed jobs whose ``finished_at``
        (``created_at`` if they have none) is older, with their metrics and hook runs; then the bench runs left
        without jobs, and the nodes whose last heartbeat is older. Pending and running jobs are never touched.

        ``keep_summary``: ``model_summary`` keeps the deleted jobs' counts and means (their sums go into
        ``model_summary_pruned``); without it they leave ``model_summary`` too.

        Works in batches of ``batch`` jobs, each one short transaction that skips rows a daemon holds right now, so
        the daemons are never kept waiting and an interrupted prune is simply run again. An input whose job is
        pruned is a new job if it is dropped again.
        """
        ended = jobs.c.state.in_(("done", "failed")) & (func.coalesce(jobs.c.finished_at, jobs.c.created_at) < before)
        counts = dict(jobs=0, metrics=0, hook_runs=0, bench_runs=0, nodes=0)
        last = 0
        while True:
            with self.engine.begin() as c:
                q = select(jobs.c.id).where(jobs.c.id > last, ended).order_by(jobs.c.id).limit(batch)
                ids = [r.id for r in c.execute(q.with_for_update(skip_locked=True))]
                if not ids:
                    break
                last = ids[-1]
                if keep_summary:
                    self._keep_summary(c, ids)
                counts["metrics"] += c.execute(metrics.delete().where(metrics.c.job_id.in_(ids))).rowcount
                counts["hook_runs"] += c.execute(hook_runs.delete().where(hook_runs.c.job_id.in_(ids))).rowcount
                counts["jobs"] += c.execute(jobs.delete().where(jobs.c.id.in_(ids))).rowcount
        with self.engine.begin() as c:
            used = select(jobs.c.bench_run_id).where(jobs.c.bench_run_id.is_not(None))
            old_runs = bench_runs.delete().where(bench_runs.c.started_at < before, bench_runs.c.id.not_in(used))
            counts["bench_runs"] = c.execute(old_runs).rowcount
            counts["nodes"] = c.execute(nodes.delete().where(nodes.c.heartbeat_at < before)).rowcount
        return Pruned(**counts)

    def _keep_summary(self, c: Connection, ids: list[int]) -> None:
        """Add the model_summary parts of jobs ``ids`` to model_summary_pruned, before they are deleted."""
        parts = text(f"SELECT {SUMMARY_PARTS} FROM job_metrics WHERE id IN :ids GROUP BY model_id, scale, mode")
        rows = [dict(r._mapping) for r in c.execute(parts.bindparams(bindparam("ids", expanding=True)), {"ids": ids})]
        if not rows:
            return
        stmt = _insert(self.engine.dialect.name)(model_summary_pruned)
        t = model_summary_pruned.c
        added = {k.name: func.coalesce(k, 0) + func.coalesce(stmt.excluded[k.name], 0) for k in t if not k.primary_key}
        c.execute(stmt.on_conflict_do_update(index_elements=["model_id", "scale", "mode"], set_=added), rows)

    # --- reads -------------------------------------------------------------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        with self.engine.connect() as c:
            row = c.execute(select(jobs).where(jobs.c.id == job_id)).first()
            return self._job(row) if row else None

    def row(self, job_id: int) -> dict[str, Any] | None:
        """The job's whole row, every column (for tests and the CLI)."""
        with self.engine.connect() as c:
            row = c.execute(select(jobs).where(jobs.c.id == job_id)).first()
            return dict(row._mapping) if row else None

    def states(self, job_ids: Iterable[int]) -> dict[int, str]:
        """The state of each of ``job_ids`` (one query)."""
        ids = list(job_ids)
        if not ids:
            return {}
        with self.engine.connect() as c:
            return {r.id: r.state for r in c.execute(select(jobs.c.id, jobs.c.state).where(jobs.c.id.in_(ids)))}

    def owner_of_output(self, path: str) -> int | None:
        """The id of the job whose output is ``path``, if any."""
        with self.engine.connect() as c:
            return c.execute(select(jobs.c.id).where(jobs.c.output_path == path).limit(1)).scalar()

    def counts(self, node: str | None = None) -> dict[str, int]:
        """Jobs per state; with ``node``, running jobs are this node's only."""
        with self.engine.connect() as c:
            q = select(jobs.c.state, func.count()).group_by(jobs.c.state)
            rows = c.execute(q).all()
            result = dict.fromkeys(STATES, 0) | {r[0]: r[1] for r in rows}
            if node is not None:
                result["running"] = (
                    c.execute(select(func.count()).where(jobs.c.state == "running", jobs.c.node == node)).scalar() or 0
                )
        return result

    def metrics_of(self, job_id: int) -> dict[str, float]:
        with self.engine.connect() as c:
            rows = c.execute(select(metrics.c.name, metrics.c.value).where(metrics.c.job_id == job_id)).all()
        return {r.name: r.value for r in rows}

    def add_bench_run(self, settings_json: str, report_path: str | None = None) -> int:
        with self.engine.begin() as c:
            key = c.execute(
                bench_runs.insert().values(started_at=self.clock(), settings=settings_json, report_path=report_path)
            ).inserted_primary_key
            assert key is not None  # an INSERT of one row
            return int(key[0])

    def set_bench_report(self, run_id: int, report_path: str) -> None:
        with self.engine.begin() as c:
            c.execute(update(bench_runs).where(bench_runs.c.id == run_id).values(report_path=report_path))
