"""Two ingest writers on one PostgreSQL database (what two replicas are): batches that touch the same
devices in opposite orders wait for each other or are written again, and no message's rows are lost."""

from __future__ import annotations

import threading

import sqlalchemy as sa

from fleet_server.db import Database
from fleet_server.enrollment import enroll
from fleet_server.events import EventBus
from fleet_server.ingest import Ingest
from tests.fleet.conftest import HARDWARE
from toco_core.messages import HardwareInfo, MessageKind, StateMessage, TelemetryMessage, encode

DEVICES = [f"cam-{i:02d}" for i in range(24)]
ROUNDS = 12


def batch(order: list[str], t: float) -> list[tuple[MessageKind, str, bytes, bool]]:
    """One device at a time: its online state (a savepoint, so its row is written now) then a telemetry point."""
    items = []
    for dev in order:
        state = StateMessage(device_id=dev, state="online", birth=1, agent_version="sim-1", group="line",
                             hardware=HardwareInfo(**HARDWARE, device_id=dev))
        point = TelemetryMessage(device_id=dev, sent_at=t, cpu_load=0.1, mem_available=1 << 20, disk_free=1 << 30,
                                 inferences=1)
        items += [(MessageKind.STATE, dev, encode(state), False), (MessageKind.TELEMETRY, dev, encode(point), False)]
    return items


def test_two_writers_crossing_on_the_same_devices_lose_no_rows(pg_url):
    setup = Database(pg_url)
    for dev in DEVICES:
        enroll(setup, dev, "line")
    setup.close()
    writers = [Ingest(Database(pg_url), EventBus()) for _ in range(2)]
    orders = [DEVICES, DEVICES[::-1]]  # opposite lock orders: the classic deadlock, if rows were locked as met
    start = threading.Barrier(2)

    def run(w: int) -> None:
        for r in range(ROUNDS):
            start.wait()
            writers[w]._process(batch(orders[w], 1000.0 * w + r))

    threads = [threading.Thread(target=run, args=(w,)) for w in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    stats = [dict(w.stats) for w in writers]
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT count(*) FROM telemetry")).scalar_one()
    engine.dispose()
    for w in writers:
        w.db.close()
    assert all(s.get("errors", 0) == 0 for s in stats), stats
    assert stored == 2 * ROUNDS * len(DEVICES), (stored, stats)
