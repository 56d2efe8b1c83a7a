"""Retention housekeeping (a singleton duty): old telemetry points and old event-log rows are deleted.

Telemetry grows by a row per device message; ``telemetry_keep`` newest points per device are what the
dashboard's charts and GET /api/devices/{id} show, so older ones are deleted. The event log
(GET /api/event-log) keeps ``events_keep_days``. Runs from the leader's housekeeping loop every
``interval_s``; each device is trimmed in its own short transaction, so ingest on other replicas (or
other threads) never waits long behind it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select

from fleet_server.db import Database, DeviceRow, EventRow, TelemetryRow

log = logging.getLogger("toco.fleet.retention")


class Retention:
    """Deletes telemetry beyond ``telemetry_keep`` per device and events older than ``events_keep_s``."""

    def __init__(self, db: Database, *, telemetry_keep: int, events_keep_s: float, interval_s: float) -> None:
        self.db, self.telemetry_keep, self.events_keep_s, self.interval_s = db, telemetry_keep, events_keep_s, interval_s
        self._next = 0.0

    def tick(self, now: float | None = None) -> dict[str, int] | None:
        """Run once ``interval_s`` passed since the last run. Returns the rows deleted per table, or None
        when it was not due yet."""
        now = time.time() if now is None else now
        if now < self._next:
            return None
        self._next = now + self.interval_s
        return self.run(now)

    def run(self, now: float | None = None) -> dict[str, int]:
        """Trim telemetry and the event log now. Returns ``{"telemetry": n, "events": m}`` rows deleted."""
        now = time.time() if now is None else now
        with self.db.session() as s:  # every telemetry row belongs to a device row (ingest makes it first)
            devices = s.scalars(select(DeviceRow.id)).all()
        telemetry = sum(self._trim_device(device_id) for device_id in devices)
        with self.db.session(write=True) as s:
            result = cast(CursorResult[Any], s.execute(delete(EventRow).where(EventRow.t < now - self.events_keep_s)))
            events = result.rowcount
        if telemetry or events:
            log.info("retention deleted old rows", extra={"fields": {"telemetry": telemetry, "events": events}})
        return {"telemetry": telemetry, "events": events}

    def _trim_device(self, device_id: str) -> int:
        # the (device_id, t) index finds the newest point beyond the ones kept; everything older goes.
        # Points with that very timestamp go too, so at most telemetry_keep points remain
        with self.db.session(write=True) as s:
            cutoff = s.scalar(select(TelemetryRow.t).where(TelemetryRow.device_id == device_id)
                              .order_by(TelemetryRow.t.desc()).offset(self.telemetry_keep).limit(1))
            if cutoff is None:
                return 0
            result = cast(CursorResult[Any], s.execute(delete(TelemetryRow).where(TelemetryRow.device_id == device_id,
                                                                                  TelemetryRow.t <= cutoff)))
            return result.rowcount
