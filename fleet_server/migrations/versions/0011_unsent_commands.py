"""The unsent_commands table: drift-policy commands the MQTT client refused, kept for the leader's tick.

A command refused by the MQTT client (PublishRefused: every packet id taken while the broker is away or
slow) was logged and dropped; it is now kept here and sent once publishing works
(fleet_server.command_outbox).

Revision ID: 0011_unsent_commands
Revises: 0010_replicas
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_unsent_commands"
down_revision = "0010_replicas"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the table."""
    op.create_table(
        "unsent_commands",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("command", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(300), nullable=True),
    )


def downgrade() -> None:
    """Drop it (commands still kept in it are lost)."""
    op.drop_table("unsent_commands")
