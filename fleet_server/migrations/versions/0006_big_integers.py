"""64-bit integers on PostgreSQL: byte counts, counters and the ids of the per-message tables.

The schema said INTEGER, which SQLite stores in 64 bits but PostgreSQL in 32: a box reporting
more than 2 GiB of free memory made every telemetry insert fail (integer out of range), as would a
model over 2 GiB, an agent past 2**31 inferences, and, at 10,000 devices, the telemetry ids
within weeks. SQLite databases are unchanged (their INTEGER is already 64-bit, and an INTEGER
primary key must stay INTEGER to remain the auto-numbered rowid).

Revision ID: 0006_big_integers
Revises: 0005_drift_alerts
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_big_integers"
down_revision = "0005_drift_alerts"
branch_labels = None
depends_on = None

# (table, column) widened; the ids are the auto-numbered primary keys of the tables written per message
VALUES = [("models", "weights"), ("models", "size_bytes"), ("bundles", "size"), ("telemetry", "available_memory"),
          ("telemetry", "inferences")]
IDS = ["telemetry", "deployment_timeline", "drift_reports", "field_samples", "events"]


def upgrade() -> None:
    """On PostgreSQL, widen the columns to BIGINT and the id sequences to bigint; on SQLite, nothing."""
    _retype(sa.BigInteger(), "bigint")


def downgrade() -> None:
    """On PostgreSQL, narrow them back to INTEGER (fails, changing nothing, if a value no longer fits)."""
    _retype(sa.Integer(), "integer")


def _retype(to: sa.types.TypeEngine, sequence_type: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":  # INTEGER is 64-bit there already; see the module docstring
        return
    for table, column in VALUES + [(t, "id") for t in IDS]:
        op.alter_column(table, column, type_=to)
    if bind.dialect.name == "postgresql":  # a serial's sequence has its own type, capped at 2**31 - 1 for integer
        for table in IDS:
            seq = bind.execute(sa.text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar()
            if seq is not None:
                op.execute(sa.text(f"ALTER SEQUENCE {seq} AS {sequence_type}"))
