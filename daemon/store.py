"""The durable job store: SQLAlchemy 2 Core over SQLite (WAL, busy timeout) or any SQLAlchemy URL.

A job is unique on (content sha256, rule fingerprint): duplicate events, rescans and restarts find the existing row
instead of making a second one. The worker's whole life with a job goes through this small interface: register,
claim, set the output path, finish or fail. Every state change is one committed transaction.

Times are UTC, stored by SQLAlchemy as ``YYYY-MM-DD HH:MM:SS.ffffff`` text on SQLite, so ``datetime('now')``
comparisons work in ad-hoc SQL.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Iterable, Mapping
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
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from daemon.metrics import Metric

SCHEMA_VERSION = 2  # 2: bench_runs, jobs.bench_run_id
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
    Column("precision", String(8)),
    Column("rule_json", Text),
    Column("worker", String(128)),
    Column("progress", String(64)),  # the running job's last reported progress: "tile 3/12", "step 20/50"
    Column("created_at", DateTime, nullable=False),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("updated_at", DateTime, nullable=False),
    *[Column(f"t_{s}", Float) for s in STAGES],
    Column("bench_run_id", Integer, ForeignKey("bench_runs.id")),  # set on source "bench" rows only
    UniqueConstraint("content_sha256", "rule_fingerprint", name="uq_jobs_content_rule"),
    Index("ix_jobs_state", "state", "next_attempt_at"),
    Index("ix_jobs_model", "model_id"),
    Index("ix_jobs_created", "created_at"),
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

_METRIC_COLS = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "mse_rgb", "brisque", "lr_psnr_y", "lr_ssim_y")
_PIVOT = ",\n  ".join(f"MAX(CASE WHEN m.name = '{n}' THEN m.value END) AS {n}" for n in _METRIC_COLS)

VIEWS = {
    # One row per job with its metrics as columns: the easiest table to query by hand.
    "job_metrics": f"""
SELECT j.id, j.state, j.folder, j.rel_path, j.model_id, j.scale, j.outscale, j.mode, j.device,
  j.input_width, j.input_height, j.output_width, j.output_height, j.t_total, j.t_infer, j.created_at,
  j.finished_at,
  {_PIVOT}
FROM jobs j LEFT JOIN metrics m ON m.job_id = j.id
GROUP BY j.id""",
    # Per model, scale and mode: how many, how fast, how good.
    "model_summary": """
SELECT model_id, scale, mode, COUNT(*) AS jobs,
  SUM(CASE WHEN state = 'done' THEN 1 ELSE 0 END) AS done,
  SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS failed,
  AVG(CASE WHEN state = 'done' THEN t_total END) AS mean_total_s,
  AVG(CASE WHEN state = 'done' THEN t_infer END) AS mean_infer_s,
  AVG(psnr_y) AS mean_psnr_y, AVG(ssim_y) AS mean_ssim_y, AVG(brisque) AS mean_brisque,
  AVG(lr_psnr_y) AS mean_lr_psnr_y
FROM job_metrics GROUP BY model_id, scale, mode""",
    # The last jobs first, with the fields a person looks at.
    "recent_jobs": """
SELECT id, state, folder, rel_path, model_id, scale, device, t_total, error_kind, error, output_path,
  created_at, finished_at
FROM jobs ORDER BY id DESC""",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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
    engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
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

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.create()

    def create(self) -> None:
        metadata.create_all(self.engine)
        with self.engine.begin() as c:
            # Schema 1 databases lack jobs.bench_run_id: add it (NULL on old rows) and record the new version.
            if "bench_run_id" not in {col["name"] for col in inspect(c).get_columns("jobs")}:
                c.execute(text("ALTER TABLE jobs ADD COLUMN bench_run_id INTEGER REFERENCES bench_runs(id)"))
                c.execute(update(meta).where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))
            for name, sql in VIEWS.items():
                c.execute(text(f"CREATE VIEW IF NOT EXISTS {name} AS {sql}"))
            if c.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first() is None:
                c.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))

    def close(self) -> None:
        self.engine.dispose()

    # --- the worker's interface ----------------------------------------------------------------------------------
    def register(self, sha: str, fingerprint: str, fields: Mapping[str, Any], state: str = "pending") -> Registered:
        """Create the job for (sha, fingerprint), or return the one that exists. Idempotent.

        ``state="running"`` creates it already claimed by this process, for a file that must fail without ever
        being offered to a worker (a symlink, say).
        """
        now = utcnow()
        key = (jobs.c.content_sha256 == sha) & (jobs.c.rule_fingerprint == fingerprint)
        with self.engine.begin() as c:
            row = c.execute(select(jobs.c.id, jobs.c.state, jobs.c.input_path, jobs.c.output_path).where(key)).first()
            if row is not None:
                return Registered(row.id, row.state, False, row.input_path, row.output_path)
            try:
                with c.begin_nested():
                    claimed = dict(attempts=1, started_at=now, worker=worker_id()) if state == "running" else {}
                    res = c.execute(jobs.insert().values(
                        content_sha256=sha, rule_fingerprint=fingerprint, state=state, created_at=now,
                        updated_at=now, **({"attempts": 0} | claimed), **fields))
            except IntegrityError:  # another process registered it between our select and insert
                row = c.execute(select(jobs.c.id, jobs.c.state, jobs.c.input_path, jobs.c.output_path)
                                .where(key)).one()
                return Registered(row.id, row.state, False, row.input_path, row.output_path)
            return Registered(res.inserted_primary_key[0], state, True, fields["input_path"], None)

    def claim(self, now: dt.datetime | None = None, job_id: int | None = None) -> dict | None:
        """Move the oldest due pending job (or ``job_id``) to running and return its row, or None."""
        now = now or utcnow()
        with self.engine.begin() as c:
            q = select(jobs.c.id).where(jobs.c.state == "pending")
            if job_id is not None:
                q = q.where(jobs.c.id == job_id)
            else:
                q = q.where((jobs.c.next_attempt_at.is_(None)) | (jobs.c.next_attempt_at <= now))
            row = c.execute(q.order_by(jobs.c.id).limit(1)).first()
            if row is None:
                return None
            done = c.execute(
                update(jobs).where(jobs.c.id == row.id, jobs.c.state == "pending")
                .values(state="running", started_at=now, updated_at=now, attempts=jobs.c.attempts + 1,
                        worker=worker_id())
            )
            if done.rowcount != 1:  # someone else took it
                return None
            return dict(c.execute(select(jobs).where(jobs.c.id == row.id)).one()._mapping)

    def update(self, job_id: int, **fields: Any) -> None:
        with self.engine.begin() as c:
            c.execute(update(jobs).where(jobs.c.id == job_id).values(updated_at=utcnow(), **fields))

    def finish(self, job_id: int, fields: Mapping[str, Any], results: Iterable[Metric]) -> None:
        """Mark the job done and store its metrics, atomically."""
        now = utcnow()
        with self.engine.begin() as c:
            c.execute(update(jobs).where(jobs.c.id == job_id).values(
                state="done", finished_at=now, updated_at=now, error=None, error_kind=None, **fields))
            c.execute(metrics.delete().where(metrics.c.job_id == job_id))
            rows = [dict(job_id=job_id, name=m.name, value=m.value, space=m.space, shave=m.shave,
                         reference=m.reference, protocol=m.protocol) for m in results]
            if rows:
                c.execute(metrics.insert(), rows)

    def fail(self, job_id: int, kind: str, error: str, fields: Mapping[str, Any] | None = None) -> None:
        now = utcnow()
        self.update(job_id, state="failed", error_kind=kind, error=error, finished_at=now, **(fields or {}))

    def retry_later(self, job_id: int, kind: str, error: str, at: dt.datetime) -> None:
        self.update(job_id, state="pending", error_kind=kind, error=error, next_attempt_at=at)

    def release(self, job_id: int) -> None:
        """Give a running job back to the queue untouched (shutdown deadline): its attempt does not count."""
        with self.engine.begin() as c:
            c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "running")
                      .values(state="pending", attempts=jobs.c.attempts - 1, updated_at=utcnow()))

    def recover(self) -> int:
        """Jobs left ``running`` by a crash become pending again. Returns how many."""
        with self.engine.begin() as c:
            res = c.execute(update(jobs).where(jobs.c.state == "running")
                            .values(state="pending", updated_at=utcnow()))
            return res.rowcount

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
