"""Alembic migrations for the store, on SQLite and PostgreSQL alike, run from code (no alembic.ini).

:func:`upgrade` is what ``Store()``, ``upscaled run`` and ``upscaled db upgrade`` call. A database made before
Alembic (schema 1 or 2, recognised by a ``jobs`` table without ``alembic_version``) is first *adopted*: the old
ad-hoc step that added ``jobs.bench_run_id`` is replayed, tables and views of revision 0001 that it lacks are made,
and it is stamped 0001; the normal revisions follow. Rows are never rewritten.

A new revision: ``alembic -c daemon/migrations/alembic.ini revision -m "what"`` writes a file from
``script.py.mako`` into ``versions/``; name it ``NNNN_what.py`` with ``revision = "NNNN"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import (
    Column,
    Connection,
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
    inspect,
    text,
)
from sqlalchemy.engine import Engine

if TYPE_CHECKING:  # alembic is imported where a migration runs: the readers (`upscaled history`) import the views only
    from alembic.config import Config

HERE = Path(__file__).resolve().parent
BASELINE = "0001"
# Any constant: the advisory lock that serialises concurrent upgrades of one PostgreSQL database.
_PG_LOCK = 0x75707363616C6564 & 0x7FFFFFFFFFFFFFFF  # "upscaled"

# The views of revision 0001, frozen here: later revisions that change a view replace it themselves. Portable SQL:
# PostgreSQL accepts `GROUP BY j.id` with other j columns because j.id is the primary key.
_PIVOT = ",\n  ".join(
    f"MAX(CASE WHEN m.name = '{n}' THEN m.value END) AS {n}"
    for n in ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "mse_rgb", "brisque", "lr_psnr_y", "lr_ssim_y")
)
VIEWS_0001 = {
    "job_metrics": f"""
SELECT j.id, j.state, j.folder, j.rel_path, j.model_id, j.scale, j.outscale, j.mode, j.device,
  j.input_width, j.input_height, j.output_width, j.output_height, j.t_total, j.t_infer, j.created_at,
  j.finished_at,
  {_PIVOT}
FROM jobs j LEFT JOIN metrics m ON m.job_id = j.id
GROUP BY j.id""",
    "model_summary": """
SELECT model_id, scale, mode, COUNT(*) AS jobs,
  SUM(CASE WHEN state = 'done' THEN 1 ELSE 0 END) AS done,
  SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS failed,
  AVG(CASE WHEN state = 'done' THEN t_total END) AS mean_total_s,
  AVG(CASE WHEN state = 'done' THEN t_infer END) AS mean_infer_s,
  AVG(psnr_y) AS mean_psnr_y, AVG(ssim_y) AS mean_ssim_y, AVG(brisque) AS mean_brisque,
  AVG(lr_psnr_y) AS mean_lr_psnr_y
FROM job_metrics GROUP BY model_id, scale, mode""",
    "recent_jobs": """
SELECT id, state, folder, rel_path, model_id, scale, device, t_total, error_kind, error, output_path,
  created_at, finished_at
FROM jobs ORDER BY id DESC""",
}

# What model_summary averages, by the name its mean takes (mean_<name>), and the expression over job_metrics.
SUMMARY_MEANS = {
    "total_s": "CASE WHEN state = 'done' THEN t_total END",
    "infer_s": "CASE WHEN state = 'done' THEN t_infer END",
    "psnr_y": "psnr_y",
    "ssim_y": "ssim_y",
    "brisque": "brisque",
    "lr_psnr_y": "lr_psnr_y",
}
# model_summary's parts over job_metrics, per model, scale and mode: counts, and a sum and a count per mean, so parts
# add up (live rows and model_summary_pruned alike) and the means are taken once, at the end.
SUMMARY_PARTS = """model_id, scale, mode, COUNT(*) AS jobs,
  SUM(CASE WHEN state = 'done' THEN 1 ELSE 0 END) AS done,
  SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS failed,
  """ + ",\n  ".join(f"SUM({e}) AS {k}_sum, COUNT({e}) AS {k}_n" for k, e in SUMMARY_MEANS.items())
# Revision 0007: model_summary adds what `upscaled db prune` kept of the rows it deleted (model_summary_pruned).
VIEWS_PRUNED = VIEWS_0001 | {
    "model_summary": f"""
SELECT model_id, scale, mode, SUM(jobs) AS jobs, SUM(done) AS done, SUM(failed) AS failed,
  {", ".join(f"SUM({k}_sum) / NULLIF(SUM({k}_n), 0) AS mean_{k}" for k in SUMMARY_MEANS)}
FROM (
  SELECT {SUMMARY_PARTS}
  FROM job_metrics GROUP BY model_id, scale, mode
  UNION ALL
  SELECT model_id, scale, mode, jobs, done, failed, {", ".join(f"{k}_sum, {k}_n" for k in SUMMARY_MEANS)}
  FROM model_summary_pruned
) parts
GROUP BY model_id, scale, mode""",
}


def create_views(conn: Connection, views: dict[str, str]) -> None:
    """(Re)create ``views`` in order; dependants are dropped first (model_summary reads job_metrics)."""
    for name in reversed(list(views)):
        conn.execute(text(f"DROP VIEW IF EXISTS {name}"))
    for name, sql in views.items():
        conn.execute(text(f"CREATE VIEW {name} AS {sql}"))


def config(conn: Connection | None = None) -> Config:
    """An Alembic config for ``versions/``, bound to ``conn`` (used by env.py) when given."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("version_locations", str(HERE / "versions"))
    cfg.set_main_option("path_separator", "os")
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    """The newest revision."""
    from alembic.script import ScriptDirectory

    rev = ScriptDirectory.from_config(config()).get_current_head()
    assert rev is not None
    return rev


def current(conn: Connection) -> str | None:
    """The database's revision; None for an empty database or one made before Alembic."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _tables_0001() -> tuple[Table, Table, Table]:
    """bench_runs, metrics and meta as revision 0001 made them, frozen here: the store's tables have grown since
    (bench_runs.report_path in 0005), and a database adopted at 0001 must be exactly 0001 before the revisions run."""
    md = MetaData()
    bench_runs = Table(
        "bench_runs",
        md,
        Column("id", Integer, primary_key=True),
        Column("started_at", DateTime, nullable=False),
        Column("settings", Text, nullable=False),
    )
    metrics = Table(
        "metrics",
        md,
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
    meta = Table("meta", md, Column("key", String(64), primary_key=True), Column("value", Text))
    Table("jobs", md, Column("id", Integer, primary_key=True))  # the foreign key's target, never created here
    return bench_runs, metrics, meta


def _adopt(conn: Connection) -> None:
    """Bring a pre-Alembic database (schema 1 or 2) to exactly revision 0001 and stamp it."""
    bench_runs, metrics, meta = _tables_0001()

    cols = {c["name"] for c in inspect(conn).get_columns("jobs")}
    if "bench_run_id" not in cols:  # schema 1: the ad-hoc migration of before, kept as it was
        bench_runs.create(conn, checkfirst=True)
        conn.execute(text("ALTER TABLE jobs ADD COLUMN bench_run_id INTEGER REFERENCES bench_runs(id)"))
    for table in (bench_runs, metrics, meta):  # their shape has not changed since schema 1
        table.create(conn, checkfirst=True)
    create_views(conn, VIEWS_0001)
    conn.execute(text("DELETE FROM meta WHERE key = 'schema_version'"))
    conn.execute(text("INSERT INTO meta (key, value) VALUES ('schema_version', '2')"))
    from alembic import command

    command.stamp(config(conn), BASELINE)


def upgrade(engine: Engine, target: str = "head") -> tuple[str | None, str]:
    """Migrate the database behind ``engine`` to ``target``; returns (revision before, revision after).

    One transaction, so a failed migration leaves the database as it was. Concurrent callers wait for each
    other: BEGIN IMMEDIATE on SQLite, ``pg_advisory_xact_lock`` on PostgreSQL.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database refused a step (it is rolled back).
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # A migration may rewrite a large table, and may wait for another daemon's: not bound by the daemon's
            # statement_timeout (this transaction only).
            conn.execute(text("SET LOCAL statement_timeout = 0"))
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
        before = current(conn)
        if before is None and inspect(conn).has_table("jobs"):
            _adopt(conn)
            before = "legacy"
        from alembic import command

        command.upgrade(config(conn), target)
        after = current(conn)
    assert after is not None
    return before, after
