"""Retention housekeeping on a real SQLite registry: telemetry beyond ``telemetry_keep`` per device and
events older than ``events_keep_days`` are deleted; the event log reads newest first, by kind, in pages."""

from __future__ import annotations

import time

from fleet_server.db import Database, DeviceRow, DriftRow, EventRow, TelemetryRow
from fleet_server.event_log import recent_events
from fleet_server.retention import Retention


def test_retention_trims_telemetry_per_device_and_old_events(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    now = time.time()
    with db.session(write=True) as s:
        for dev, n in (("cam-1", 25), ("cam-2", 5)):
            s.add(DeviceRow(id=dev, group="line", online=True, birth=1, last_seen=now, hardware={}))
            s.add_all(TelemetryRow(device_id=dev, t=now - 100 + i, cpu_percent=1.0, available_memory=1, inferences=i)
                      for i in range(n))
        s.add_all([EventRow(t=now - 3 * 86400, kind="deployment", data={"old": True}),
                   EventRow(t=now - 10, kind="deployment", data={"n": 1}),
                   EventRow(t=now - 5, kind="analysis", data={"n": 2})])
    retention = Retention(db, telemetry_keep=10, events_keep_s=2 * 86400, interval_s=60)
    assert retention.tick(now) == {"telemetry": 15, "drift": 0, "events": 1, "bundles": 0}
    assert retention.tick(now + 1) is None  # not due again before interval_s
    with db.session() as s:
        kept = sorted(s.query(TelemetryRow.t).filter(TelemetryRow.device_id == "cam-1").all())
        assert [t for (t,) in kept] == [now - 100 + i for i in range(15, 25)]
        assert s.query(TelemetryRow).filter(TelemetryRow.device_id == "cam-2").count() == 5
    events = recent_events(db)
    assert [e["data"] for e in events] == [{"n": 2}, {"n": 1}]
    assert [e["kind"] for e in recent_events(db, kind="deployment")] == ["deployment"]
    assert recent_events(db, limit=1, before=events[0]["id"])[0]["data"] == {"n": 1}
    db.close()


def test_retention_keeps_drift_windows_by_count_and_age(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    now = time.time()
    with db.session(write=True) as s:
        for dev in ("cam-1", "cam-2"):
            s.add(DeviceRow(id=dev, group="line", online=True, birth=1, last_seen=now, hardware={}))
        # cam-1: 30 recent windows; cam-2: 4 recent ones and 3 from 40 days ago
        s.add_all(DriftRow(device_id="cam-1", bundle_id=None, window=i, t=now - 300 * (30 - i), alert=False, point={})
                  for i in range(30))
        s.add_all(DriftRow(device_id="cam-2", bundle_id=None, window=i, t=now - (40 * 86400 if i < 3 else 10 - i),
                           alert=False, point={}) for i in range(7))
    retention = Retention(db, telemetry_keep=10, events_keep_s=86400, interval_s=60, drift_keep=12,
                          drift_keep_s=30 * 86400)
    assert retention.run(now)["drift"] == 18 + 3
    with db.session() as s:
        windows = lambda dev: sorted(w for (w,) in s.query(DriftRow.window).filter(DriftRow.device_id == dev).all())  # noqa: E731
        assert windows("cam-1") == list(range(18, 30))
        assert windows("cam-2") == [3, 4, 5, 6]
    assert retention.run(now)["drift"] == 0
    db.close()
