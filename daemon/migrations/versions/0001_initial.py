"""Schema 2, the schema before Alembic: jobs, metrics, bench_runs, meta and the three views.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from daemon.migrations import VIEWS_0001, create_views

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bench_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "meta",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("rule_fingerprint", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error_kind", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("folder", sa.Text(), nullable=False),
        sa.Column("rel_path", sa.Text(), nullable=False),
        sa.Column("input_path", sa.Text(), nullable=False),
        sa.Column("input_size", sa.Integer(), nullable=True),
        sa.Column("input_width", sa.Integer(), nullable=True),
        sa.Column("input_height", sa.Integer(), nullable=True),
        sa.Column("input_format", sa.String(length=16), nullable=True),
        sa.Column("input_mode", sa.String(length=16), nullable=True),
        sa.Column("bits", sa.Integer(), nullable=True),
        sa.Column("output_path", sa.Text(), nullable=True),
        sa.Column("output_size", sa.Integer(), nullable=True),
        sa.Column("output_width", sa.Integer(), nullable=True),
        sa.Column("output_height", sa.Integer(), nullable=True),
        sa.Column("output_format", sa.String(length=16), nullable=True),
        sa.Column("input_moved_to", sa.Text(), nullable=True),
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("backend", sa.String(length=32), nullable=True),
        sa.Column("scale", sa.Float(), nullable=False),
        sa.Column("outscale", sa.Float(), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("device", sa.String(length=16), nullable=True),
        sa.Column("precision", sa.String(length=8), nullable=True),
        sa.Column("rule_json", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=128), nullable=True),
        sa.Column("progress", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("t_queue", sa.Float(), nullable=True),
        sa.Column("t_decode", sa.Float(), nullable=True),
        sa.Column("t_load", sa.Float(), nullable=True),
        sa.Column("t_infer", sa.Float(), nullable=True),
        sa.Column("t_encode", sa.Float(), nullable=True),
        sa.Column("t_write", sa.Float(), nullable=True),
        sa.Column("t_metrics", sa.Float(), nullable=True),
        sa.Column("t_total", sa.Float(), nullable=True),
        sa.Column("bench_run_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["bench_run_id"],
            ["bench_runs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("content_sha256", "rule_fingerprint", name="uq_jobs_content_rule"),
    )
    op.create_index("ix_jobs_created", "jobs", ["created_at"], unique=False)
    op.create_index("ix_jobs_model", "jobs", ["model_id"], unique=False)
    op.create_index("ix_jobs_state", "jobs", ["state", "next_attempt_at"], unique=False)
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("space", sa.String(length=16), nullable=False),
        sa.Column("shave", sa.Integer(), nullable=False),
        sa.Column("reference", sa.String(length=16), nullable=False),
        sa.Column("protocol", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "name", name="uq_metrics_job_name"),
    )
    op.create_index("ix_metrics_name", "metrics", ["name"], unique=False)
    create_views(op.get_bind(), VIEWS_0001)
    op.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '2')")


def downgrade() -> None:
    for name in reversed(list(VIEWS_0001)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for table in ("metrics", "jobs", "meta", "bench_runs"):
        op.drop_table(table)
