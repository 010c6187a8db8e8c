"""jobs.precision holds "fp16->fp32" (10 characters) after a NaN fallback: widen it from 8 to 16.

PostgreSQL enforces VARCHAR lengths; SQLite does not (any column takes any text), so there is nothing to do there.
Rebuilding the SQLite table for a length it ignores would also cost a copy of the whole history.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _alter(new: int, old: int) -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    op.alter_column(
        "jobs", "precision", type_=sa.String(length=new), existing_type=sa.String(length=old), existing_nullable=True
    )


def upgrade() -> None:
    _alter(16, 8)


def downgrade() -> None:
    _alter(8, 16)
