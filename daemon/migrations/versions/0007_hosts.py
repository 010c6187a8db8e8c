"""Many hosts: each node's measured clock skew, and what `upscaled db prune` keeps of the rows it deletes.

- ``nodes.clock_skew_s``: the node's host clock minus the database's, measured at its last heartbeat (NULL: not
  measured yet, or a row from before).
- ``model_summary_pruned``: per model, scale and mode, the counts and the sums behind ``model_summary``'s means for
  jobs that ``upscaled db prune`` deleted; ``model_summary`` adds them to the live rows' (so its figures survive a
  prune), unless the prune was told not to keep them.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from daemon.migrations import SUMMARY_MEANS, VIEWS_0001, VIEWS_PRUNED, create_views

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("clock_skew_s", sa.Float(), nullable=True))
    op.create_table(
        "model_summary_pruned",
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("scale", sa.Float(), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("jobs", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        *[c for k in SUMMARY_MEANS for c in (sa.Column(f"{k}_sum", sa.Float()), sa.Column(f"{k}_n", sa.Integer()))],
        sa.PrimaryKeyConstraint("model_id", "scale", "mode"),
    )
    create_views(op.get_bind(), VIEWS_PRUNED)
    op.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")


def downgrade() -> None:
    create_views(op.get_bind(), VIEWS_0001)
    op.drop_table("model_summary_pruned")
    with op.batch_alter_table("nodes") as batch:  # SQLite before 3.35 cannot DROP COLUMN in place
        batch.drop_column("clock_skew_s")
    op.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
