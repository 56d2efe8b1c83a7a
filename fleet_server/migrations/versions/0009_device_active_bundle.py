"""The bundle a device runs in a column of its own (``devices.active_bundle``), indexed.

Migration 0008 indexed the expression ``active ->> 'bundle_id'``; the listing's ``version=none``
filter and the per-version counts still parsed every device's ``active`` JSON (a NOT IN cannot use
that index): 82 ms a query at 10,000 devices on PostgreSQL, 389 ms a filtered page with its facets.
The server keeps the column with ``active`` (fleet_server.db.DeviceRow); this fills it from the
JSON once and replaces the expression index.

Revision ID: 0009_device_active_bundle
Revises: 0008_device_listing_indexes
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_device_active_bundle"
down_revision = "0008_device_listing_indexes"
branch_labels = None
depends_on = None

# frozen copies of 0008's expression (a migration never imports the application)
BUNDLE = {"postgresql": "(active ->> 'bundle_id')", "sqlite": "json_extract(active, '$.bundle_id')"}


def upgrade() -> None:
    """Add and fill the column, index it, drop the expression index."""
    dialect = op.get_bind().dialect.name
    op.add_column("devices", sa.Column("active_bundle", sa.String(64), nullable=True))
    expression = BUNDLE.get(dialect)
    if expression is not None:
        op.execute(f"UPDATE devices SET active_bundle = {expression} WHERE active IS NOT NULL")
        op.drop_index("ix_devices_active_bundle", table_name="devices")
    op.create_index("ix_devices_active_bundle", "devices", ["active_bundle"])


def downgrade() -> None:
    """Back to 0008: the expression index, no column."""
    op.drop_index("ix_devices_active_bundle", table_name="devices")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("active_bundle")
    expression = BUNDLE.get(op.get_bind().dialect.name)
    if expression is not None:
        op.create_index("ix_devices_active_bundle", "devices", [sa.text(expression)])
