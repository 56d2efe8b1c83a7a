"""Retention housekeeping (a singleton duty): old telemetry points, drift windows and event-log rows are deleted.

Telemetry grows by a row per device message; ``telemetry_keep`` newest points per device are what the
dashboard's charts and GET /api/devices/{id} show, so older ones are deleted. A run trims a share of the
devices, the next ones after where the last run stopped, so that each device is visited at least once per
``cycle_s`` (600 s), and never fewer than ``MIN_DEVICES_PER_RUN``: trimming every device every minute was four
statements and two transactions per device, at 10,000 devices ~35 s of every 60 s of the leader's
housekeeping loop (py-spy, bench/fleet.py), which deployment ticks and the drift policy wait behind, and
most of it found nothing to delete (a device adds 6 points a minute). A device so holds at most
``telemetry_keep`` plus what it sends in a cycle. Drift windows (a row per
box per window, GET /api/drift and the device page's history) keep ``drift_keep`` per device and
nothing older than ``drift_keep_days``: no duty reads them back (the drift policy keeps its own
state). The event log (GET /api/event-log) keeps ``events_keep_days``. Runs from the leader's housekeeping loop every
``interval_s``; each device is trimmed in its own short transaction, so ingest on other replicas (or
other threads) never waits long behind it.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, delete, or_, select

from fleet_server.bundle_retention import delete_bundles, superseded_bundles
from fleet_server.db import Database, DeviceRow, DriftRow, EventRow, TelemetryRow

log = logging.getLogger("toco.fleet.retention")
MIN_DEVICES_PER_RUN = 200  # a small fleet is trimmed whole every run


@dataclass(frozen=True)
class BundleRetention:
    """Bundles kept per model version besides those in use, the age below which none is deleted, and
    how to stop serving one (fleet_server.bundle_retention)."""

    keep: int
    min_age_s: float
    withdraw: Callable[[str], None]


class Retention:
    """Deletes telemetry beyond ``telemetry_keep`` per device, drift windows beyond ``drift_keep`` per
    device or older than ``drift_keep_s``, and events older than ``events_keep_s``."""

    def __init__(self, db: Database, *, telemetry_keep: int, events_keep_s: float, interval_s: float,
                 drift_keep: int = 2000, drift_keep_s: float = 30 * 86400, cycle_s: float = 600.0,
                 bundles: BundleRetention | None = None) -> None:
        """``cycle_s``: the longest between two trims of one device (each run trims its share)."""
        self.db, self.telemetry_keep = db, telemetry_keep
        self.events_keep_s, self.interval_s, self.cycle_s = events_keep_s, interval_s, cycle_s
        self.drift_keep, self.drift_keep_s, self.bundles = drift_keep, drift_keep_s, bundles
        self._next = 0.0
        self._last_device = ""  # the last device the previous run trimmed: the next run goes on after it

    def tick(self, now: float | None = None) -> dict[str, int] | None:
        """Run once ``interval_s`` passed since the last run, on this run's share of the devices. Returns the
        rows deleted per table, or None when it was not due yet."""
        now = time.time() if now is None else now
        if now < self._next:
            return None
        self._next = now + self.interval_s
        return self.run(now, share=True)

    def next_share(self, devices: list[str]) -> list[str]:
        """The devices this run trims: of the sorted ``devices``, the next ceil(n * interval_s / cycle_s) (at
        least MIN_DEVICES_PER_RUN, at most all) after the last one trimmed, wrapping around. Raises nothing."""
        k = max(MIN_DEVICES_PER_RUN, math.ceil(len(devices) * self.interval_s / self.cycle_s))
        if k >= len(devices):
            return devices
        start = bisect.bisect_right(devices, self._last_device)
        chosen = (devices[start:] + devices[:start])[:k]
        self._last_device = chosen[-1]
        return chosen

    def run(self, now: float | None = None, share: bool = False) -> dict[str, int]:
        """Trim telemetry and drift windows of every device (``share``: of this run's share, next_share),
        the event log, and delete superseded bundles (when configured), now. Returns what was deleted,
        ``{"telemetry": n, "drift": k, "events": m, "bundles": b}``."""
        now = time.time() if now is None else now
        with self.db.session() as s:  # every telemetry and drift row belongs to a device row (ingest makes it first)
            devices = list(s.scalars(select(DeviceRow.id).order_by(DeviceRow.id)).all())
        if share:
            devices = self.next_share(devices)
        telemetry = sum(self._trim(TelemetryRow, d, self.telemetry_keep, None) for d in devices)
        drift = sum(self._trim(DriftRow, d, self.drift_keep, now - self.drift_keep_s) for d in devices)
        with self.db.session(write=True) as s:
            result = cast(CursorResult[Any], s.execute(delete(EventRow).where(EventRow.t < now - self.events_keep_s)))
            events = result.rowcount
        bundles = 0
        if self.bundles is not None:
            b = self.bundles
            bundles = len(delete_bundles(self.db, superseded_bundles(self.db, b.keep, b.min_age_s, now), b.withdraw))
        if telemetry or drift or events:
            log.info("retention deleted old rows",
                     extra={"fields": {"telemetry": telemetry, "drift": drift, "events": events}})
        return {"telemetry": telemetry, "drift": drift, "events": events, "bundles": bundles}

    def _trim(self, table: type[TelemetryRow] | type[DriftRow], device_id: str, keep: int, before: float | None) -> int:
        # the (device_id, t) index finds the newest row beyond the ones kept; everything older goes.
        # Rows with that very timestamp go too, so at most ``keep`` rows remain
        # (``before``: rows older than it go as well)
        with self.db.session(write=True) as s:
            cutoff = s.scalar(select(table.t).where(table.device_id == device_id)
                              .order_by(table.t.desc()).offset(keep).limit(1))
            old = [table.t <= cutoff] if cutoff is not None else []
            old += [table.t < before] if before is not None else []
            if not old:
                return 0
            result = cast(CursorResult[Any], s.execute(delete(table).where(table.device_id == device_id, or_(*old))))
            return result.rowcount
