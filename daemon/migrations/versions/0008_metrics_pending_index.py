"""An index on the metrics still to come: ``jobs (metrics_state, id)``.

Done jobs whose metrics wait beyond the worker's in-memory backlog are left to the store and read back a page at a
time, oldest first (``metrics_pending``, also at every start). Without the index each page is a search of every done
job and a sort: its cost grows with the table, over a million jobs about a second a page. With it, a page costs what
it reads.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_metrics", "jobs", ["metrics_state", "id"])
    op.execute("UPDATE meta SET value = '8' WHERE key = 'schema_version'")


def downgrade() -> None:
    op.drop_index("ix_jobs_metrics", table_name="jobs")
    op.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
