"""Drift alerts of two kinds, and the re-analysis gate.

A drift alert is now a record of its own (``drift_alerts``): fidelity drift (the compressed model
stops agreeing with its base: re-analysis with field samples) or data drift (the base sees new
data: an operator decides), with what the server did about it and why (cooldown, daily cap,
quorum, data drift, escalation). Devices keep the kind of their current alert; a re-analysis is
deployed to its trigger devices first and to their group once a quorum of the group agrees.

Revision ID: 0005_drift_alerts
Revises: 0003_device_enrollment
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_drift_alerts"
down_revision = "0004_model_versions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``drift_alerts``; add ``devices.drift_kind`` and the group stage of ``reanalyses``.

    Existing re-analyses keep their meaning: their ``deployment_id`` was a group redeploy, nothing
    marks them as waiting for a quorum, and their devices are not sent a convergence rebase.
    Devices alerting before the upgrade show no kind until their next window.
    """
    op.create_table(
        "drift_alerts",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(40), nullable=True),
        sa.Column("group", sa.String(64), nullable=False),
        sa.Column("bundle_id", sa.String(64), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("why", sa.Text(), nullable=False),
        sa.Column("decision", sa.Text(), nullable=False, server_default=""),
        sa.Column("evidence", sa.JSON(), nullable=True),
        sa.Column("reanalysis_id", sa.String(40), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_drift_alerts_device_id", "drift_alerts", ["device_id"])
    op.create_index("ix_drift_alerts_status", "drift_alerts", ["status"])
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("drift_kind", sa.String(16), nullable=True))
    with op.batch_alter_table("reanalyses") as batch:
        batch.add_column(sa.Column("group_deployment_id", sa.String(40), nullable=True))
        batch.add_column(sa.Column("group_approved_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("rebased", sa.JSON(), nullable=True))
    # re-analyses finished before the upgrade count as rebased already: their devices have long moved on,
    # and a rebase now would silently accept whatever data they see today
    op.execute(sa.text("UPDATE reanalyses SET rebased = trigger_devices"))


def downgrade() -> None:
    """Drop the alert records and the new columns (alerts become a device flag again)."""
    with op.batch_alter_table("reanalyses") as batch:
        batch.drop_column("rebased")
        batch.drop_column("group_approved_at")
        batch.drop_column("group_deployment_id")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("drift_kind")
    op.drop_index("ix_drift_alerts_status", "drift_alerts")
    op.drop_index("ix_drift_alerts_device_id", "drift_alerts")
    op.drop_table("drift_alerts")
