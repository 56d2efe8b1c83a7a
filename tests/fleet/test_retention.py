"""Retention housekeeping on a real SQLite registry: telemetry beyond ``telemetry_keep`` per device and
events older than ``events_keep_days`` are deleted; the event log reads newest first, by kind, in pages."""

from __future__ import annotations

import time

import sqlalchemy as sa

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


def test_a_large_fleet_is_trimmed_a_share_per_run_and_whole_within_the_cycle(tmp_path):
    """Trimming every device every run kept the leader's housekeeping busy for most of each minute at 10,000
    devices; each run now takes the next share, and every device is trimmed within ``cycle_s``."""
    from fleet_server.retention import MIN_DEVICES_PER_RUN

    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    now = time.time()
    n = 3 * MIN_DEVICES_PER_RUN + 10  # a run at interval 60 / cycle 240 takes a quarter, 153, so the minimum 200
    devices = [f"dev-{i:05d}" for i in range(n)]
    with db.session(write=True) as s:
        for dev in devices:
            s.add(DeviceRow(id=dev, group="line", online=True, birth=1, last_seen=now, hardware={}))
            s.add_all(TelemetryRow(device_id=dev, t=now - 100 + i, cpu_percent=1.0, available_memory=1, inferences=i)
                      for i in range(12))
    retention = Retention(db, telemetry_keep=10, events_keep_s=86400, interval_s=60, cycle_s=240)

    def over() -> set[str]:
        with db.session() as s:
            rows = s.query(TelemetryRow.device_id).group_by(TelemetryRow.device_id).having(
                sa.func.count() > 10).all()
            return {d for (d,) in rows}

    trimmed = []
    for k in range(4):
        before = over()
        assert retention.tick(now + 60 * k)["telemetry"] == 2 * len(before - over())
        trimmed.append(before - over())
        assert len(trimmed[-1]) == min(MIN_DEVICES_PER_RUN, len(before))
    assert over() == set(), "every device trimmed within the cycle"
    assert trimmed[0] == set(devices[:200]) and trimmed[1] == set(devices[200:400]), "in id order, going on"
    # the fourth share wrapped round: the last 10 devices, then the first 190 again
    assert trimmed[3] == set(devices[600:]) and retention.next_share(devices)[0] == devices[190]
    # a direct run trims every device whatever the share
    with db.session(write=True) as s:
        s.add_all(TelemetryRow(device_id=dev, t=now + i, cpu_percent=1.0, available_memory=1, inferences=i)
                  for dev in devices for i in range(2))
    assert retention.run(now)["telemetry"] == 2 * n
    db.close()
