"""``events.kind`` widened from 16 to 32 characters.

The drift policy logs ``reanalysis_skipped`` (18 characters). SQLite ignores a VARCHAR's length,
so nobody noticed; PostgreSQL refuses the insert (value too long), which rolled back the whole
drift-policy transaction the event was part of.

Revision ID: 0007_event_kind_length
Revises: 0006_big_integers
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_event_kind_length"
down_revision = "0006_big_integers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Widen ``events.kind`` to VARCHAR(32) (batch: SQLite rewrites the table; PostgreSQL alters in place)."""
    with op.batch_alter_table("events") as batch:
        batch.alter_column("kind", type_=sa.String(32), existing_type=sa.String(16), existing_nullable=False)


def downgrade() -> None:
    """Narrow it back to VARCHAR(16); on PostgreSQL this fails, changing nothing, while a longer kind is stored."""
    with op.batch_alter_table("events") as batch:
        batch.alter_column("kind", type_=sa.String(16), existing_type=sa.String(32), existing_nullable=False)
