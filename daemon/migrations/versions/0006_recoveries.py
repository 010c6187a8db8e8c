"""Poison jobs: how often a job was taken back after its worker died, and how often it was alone in flight then.

- ``jobs.recoveries``: times the job was taken back from a worker that died (a crash, SIGKILL, the OOM killer; never a
  clean stop). A pending job with recoveries > 0 runs alone in flight when it is claimed again.
- ``jobs.alone_deaths``: of those, the times it was the only job in flight: at ``max_recoveries`` it fails as
  ``poison``.
- ``jobs.alone``: its current claim runs alone in flight (set by the claim, read when it is taken back).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("recoveries", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("alone_deaths", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("alone", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite before 3.35 cannot DROP COLUMN in place
        for col in ("alone", "alone_deaths", "recoveries"):
            batch.drop_column(col)
    op.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
