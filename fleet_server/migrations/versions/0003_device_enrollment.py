"""Device enrollment: a device is enrolled, quarantined or revoked, with the models it may run.

Until now any client the broker let in became a device, in whatever group it named. The server
now keeps each device's standing (``toco-fleet devices enroll/revoke``, fleet_server.enrollment):
only enrolled devices are deployed to or trigger re-analyses, and unknown ones are quarantined.

Revision ID: 0003_device_enrollment
Revises: 0001_baseline
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_device_enrollment"
down_revision = "0002_api_tokens"  # after the API tokens
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``devices.enrollment``, ``enrolled_at`` and ``allowed_models``.

    Devices already in the table are marked enrolled in the group they have: the broker's password
    file admitted them and the fleet keeps working after the upgrade; the operator reviews them with
    ``toco-fleet devices list`` and revokes any that should not be there. A device first seen after
    the upgrade is quarantined until enrolled (the column's server default).
    """
    with op.batch_alter_table("devices") as batch:  # batch: SQLite cannot ALTER a column's constraints in place
        batch.add_column(sa.Column("enrollment", sa.String(16), nullable=False, server_default="quarantined"))
        batch.add_column(sa.Column("enrolled_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("allowed_models", sa.JSON(), nullable=True))
    op.create_index("ix_devices_enrollment", "devices", ["enrollment"])
    op.execute(sa.text("UPDATE devices SET enrollment = 'enrolled', enrolled_at = last_seen"))


def downgrade() -> None:
    """Drop the enrollment columns (every device is again whatever it claims to be)."""
    op.drop_index("ix_devices_enrollment", "devices")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("allowed_models")
        batch.drop_column("enrolled_at")
        batch.drop_column("enrollment")
