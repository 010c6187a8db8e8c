"""The staged worker and the hostile inbox: lossless names, the input's identity, metrics after the commit, frames,
hook results, and where a bench report went.

- ``jobs.rel_path_raw``: the exact bytes of a name that is not valid UTF-8 (``rel_path`` then holds its printable
  form with ``\\xNN`` escapes); NULL for every other name.
- ``jobs.input_dev``, ``jobs.input_ino``: the device and inode the input had when it was registered; a file replaced
  under the same name afterwards is not moved as this job's input.
- ``jobs.metrics_state``: ``pending`` between the ``done`` commit and the metrics commit, then ``done`` (or
  ``lost`` when a crash in between left nothing to compute them from); NULL for jobs without metrics and old rows.
- ``jobs.frames``: the frame count of an animated input (1 for a still image).
- ``hook_runs``: one row per run of an ``on_done`` / ``on_failed`` hook, with its outcome.
- ``bench_runs.report_path``: the HTML report an ``upscaled bench --report`` run wrote.
- An index on ``jobs.output_path``: every output reservation looks its candidate up.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (NULL on old rows) works on SQLite without a table rebuild, so old rows stay untouched.
    op.add_column("jobs", sa.Column("rel_path_raw", sa.LargeBinary(), nullable=True))
    op.add_column("jobs", sa.Column("input_dev", sa.BigInteger(), nullable=True))
    op.add_column("jobs", sa.Column("input_ino", sa.BigInteger(), nullable=True))
    op.add_column("jobs", sa.Column("metrics_state", sa.String(length=16), nullable=True))
    op.add_column("jobs", sa.Column("frames", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_output", "jobs", ["output_path"])
    op.add_column("bench_runs", sa.Column("report_path", sa.Text(), nullable=True))
    op.create_table(
        "hook_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.Text()),
        sa.Column("at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_hook_runs_job", "hook_runs", ["job_id"])
    op.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")


def downgrade() -> None:
    op.drop_index("ix_hook_runs_job", "hook_runs")
    op.drop_table("hook_runs")
    with op.batch_alter_table("bench_runs") as batch:  # SQLite before 3.35 cannot DROP COLUMN in place
        batch.drop_column("report_path")
    op.drop_index("ix_jobs_output", "jobs")
    with op.batch_alter_table("jobs") as batch:
        for col in ("frames", "metrics_state", "input_ino", "input_dev", "rel_path_raw"):
            batch.drop_column(col)
    op.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
