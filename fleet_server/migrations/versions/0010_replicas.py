"""The replicas table: each replica's MQTT client id, user and session expiry (fleet_server.session_drain).

A replica SIGKILLed and not restarted leaves a broker-held session that mosquitto keeps handing its
share of the shared subscriptions; a live replica drains it under that client id, which it reads here.

Revision ID: 0010_replicas
Revises: 0009_device_active_bundle
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_replicas"
down_revision = "0009_device_active_bundle"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the table."""
    op.create_table(
        "replicas",
        sa.Column("client_id", sa.String(128), primary_key=True),
        sa.Column("replica_id", sa.String(100), nullable=False),
        sa.Column("identity", sa.String(128), nullable=False),
        sa.Column("mqtt_user", sa.String(128), nullable=True),
        sa.Column("session_expiry_s", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    """Drop it."""
    op.drop_table("replicas")
