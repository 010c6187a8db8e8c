"""Several daemons on one database: the nodes table, and each running job's owner node and heartbeat.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("stopped_at", sa.DateTime(), nullable=True),
        sa.Column("device", sa.String(length=32), nullable=True),
        sa.Column("workers", sa.Integer(), nullable=True),
        sa.Column("folders", sa.Text(), nullable=True),
        sa.Column("rules_fingerprint", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    # Plain ADD COLUMN (NULL on old rows) works on SQLite without a table rebuild, so old rows stay untouched.
    op.add_column("jobs", sa.Column("node", sa.String(length=128), nullable=True))
    op.add_column("jobs", sa.Column("heartbeat_at", sa.DateTime(), nullable=True))
    op.create_index("ix_jobs_node", "jobs", ["node", "state"], unique=False)
    op.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")


def downgrade() -> None:
    op.drop_index("ix_jobs_node", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:  # SQLite before 3.35 cannot DROP COLUMN in place
        batch.drop_column("heartbeat_at")
        batch.drop_column("node")
    op.drop_table("nodes")
    op.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
