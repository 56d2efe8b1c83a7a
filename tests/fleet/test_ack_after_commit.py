"""A serve process killed with QoS 1 device messages received but not yet committed loses none of them:
it acknowledges a message only after the batch holding it is committed, and its broker-held session
brings the unacknowledged ones back when it restarts under the same identity. A message delivered
again after its batch was committed is stored once: a drift report always, a telemetry point (the bulk of
the traffic) when the broker flags it as sent before."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from fleet_server.db import Database
from fleet_server.events import EventBus
from fleet_server.ingest import Ingest
from tests.support.broker import Broker, Listener
from tests.support.processes import free_port, stop_process
from tests.support.waiting import wait_until
from toco_core.messages import DriftCheck, DriftMessage, MessageKind, TelemetryMessage, encode
from toco_core.topics import Topics

REPO = Path(__file__).resolve().parents[2]
FLEET = "test"
T = Topics(FLEET)
DEVICES, WINDOWS = 10, 6  # 60 drift reports: more than mosquitto's default in-flight window of 20


def drift(device_id: str, window: int) -> DriftMessage:
    """One closed, in-band drift window of ``device_id``."""
    now = time.time()
    check = DriftCheck(name="agreement", value=0.99, reference=0.99, low=0.95, high=1.0, n=50, in_band=True)
    return DriftMessage(device_id=device_id, bundle_id=None, window_index=window, opened_at=now - 5, closed_at=now,
                        n_samples=100, n_shadowed=50, predicted_agreement=0.99, measured_agreement=0.99,
                        mean_confidence=0.8, mean_entropy=0.4, input_mean=0.1, input_std=0.3, checks=[check],
                        out_of_band=[], consecutive_out_of_band=0, alert=False)


class Serve:
    """One ``python -m fleet_server serve`` on a SQLite data dir and an external broker."""

    def __init__(self, tmp: Path, name: str, data: Path, broker: Broker) -> None:
        self.port = free_port()
        self.log = open(tmp / f"{name}.log", "w+b")  # noqa: SIM115 - the serve process writes it
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "fleet_server", "serve", "--fleet", FLEET, "--port",
                                      str(self.port), "--data-dir", str(data), "--broker", broker.url],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def health(self) -> dict:
        """GET /api/health; {} while it does not answer."""
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/api/health", timeout=2).json()
        except httpx.HTTPError:
            return {}

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.log.close()


@pytest.fixture()
def broker():
    b = Broker()
    b.start()
    yield b
    b.cleanup()


def drift_rows(db: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT device_id, window FROM drift_reports").fetchall()


def test_messages_queued_in_a_killed_serve_are_stored_once_after_its_restart(tmp_path, broker):
    data = tmp_path / "data"
    first = Serve(tmp_path, "first", data, broker)
    blocker: sqlite3.Connection | None = None
    second: Serve | None = None
    devices = Listener(broker.port, [])
    try:
        assert wait_until(lambda: first.health().get("broker") == "connected", 30, 0.2), first.output()
        # hold SQLite's write lock: the server's ingest batch waits for it (its busy timeout is 30 s), so
        # every message below is received and none is committed when the server dies
        blocker = sqlite3.connect(data / "fleet.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        sent = [(f"cam-{d}", w) for w in range(WINDOWS) for d in range(DEVICES)]
        for device_id, window in sent:
            devices.publish(T.device(MessageKind.DRIFT, device_id), encode(drift(device_id, window)))
        # the server takes them all un-acknowledged: it asks the broker for a receive window of 65,535 (the
        # broker's own in-flight window here is mosquitto's default 20), so messages behind a stuck batch, a
        # chunk request among them, are not held back at the broker
        assert wait_until(lambda: first.health().get("messages", {}).get("received.drift", 0) == len(sent), 10,
                          0.1), first.health().get("messages")
        first.proc.kill()
        first.proc.wait(5)
        blocker.rollback()
        blocker.close()
        blocker = None
        assert drift_rows(data / "fleet.db") == []  # nothing was committed before the kill

        second = Serve(tmp_path, "second", data, broker)
        assert wait_until(lambda: len(drift_rows(data / "fleet.db")) >= len(sent), 25, 0.2), \
            (len(drift_rows(data / "fleet.db")), second.output())
        time.sleep(0.5)  # anything delivered twice would be stored by now
        rows = drift_rows(data / "fleet.db")
        assert sorted(rows) == sorted(sent), (len(rows), second.output())
    finally:
        devices.close()
        if blocker is not None:
            blocker.close()
        first.stop()
        if second is not None:
            second.stop()


def test_a_drift_report_delivered_again_after_its_commit_is_stored_once(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    ingest = Ingest(db, EventBus())
    try:
        first, again = drift("cam-1", 3), drift("cam-1", 4)
        ingest._process([(MessageKind.DRIFT, "cam-1", encode(first), False),
                         (MessageKind.DRIFT, "cam-1", encode(again), False)])
        # the broker delivers both again (the server died before acknowledging them), next to a new one
        newer = drift("cam-1", 5)
        ingest._process([(MessageKind.DRIFT, "cam-1", encode(m), m is not newer) for m in (first, again, newer)])
        with db.engine.connect() as conn:
            windows = conn.execute(sa.text("SELECT window FROM drift_reports ORDER BY window")).scalars().all()
        assert windows == [3, 4, 5]
        assert ingest.stats["duplicates"] == 2
    finally:
        db.close()


def test_a_telemetry_point_the_broker_flags_as_sent_before_is_stored_once(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    ingest = Ingest(db, EventBus())

    def point(t: float) -> bytes:
        return encode(TelemetryMessage(device_id="cam-1", mem_available=1 << 20, disk_free=1 << 30, cpu_load=0.1,
                                       sent_at=t))
    try:
        ingest._process([(MessageKind.TELEMETRY, "cam-1", point(t), False) for t in (10.0, 20.0)])
        # 20.0 again with DUP set (stored before the kill), 30.0 with DUP set but never stored (delivered to the
        # dead replica, not committed), 40.0 new, and 40.0 once more in the same batch
        ingest._process([(MessageKind.TELEMETRY, "cam-1", point(20.0), True),
                         (MessageKind.TELEMETRY, "cam-1", point(30.0), True),
                         (MessageKind.TELEMETRY, "cam-1", point(40.0), False),
                         (MessageKind.TELEMETRY, "cam-1", point(40.0), True)])
        with db.engine.connect() as conn:
            times = conn.execute(sa.text("SELECT t FROM telemetry ORDER BY t")).scalars().all()
        assert times == [10.0, 20.0, 30.0, 40.0]
        assert ingest.stats["duplicates"] == 2
    finally:
        db.close()
