"""bench/fleet.py's simulated devices against a real mosquitto (the bench's, with a password per device)
and a real fleet server: they connect, their births, telemetry and drift windows are stored, and the
loss count calls nothing lost that was stored."""

from __future__ import annotations

from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from bench._fleet_broker import DropMonitor, server_broker_url, start_broker
from bench._fleet_loss import TRAFFIC_KINDS, drain, stored_rows
from bench._fleet_servers import Servers, start_single, wait_for
from bench._fleet_sim import Devices
from tests.support.broker import Broker
from tests.support.waiting import wait_until

IDS = [f"dev{i:04d}" for i in range(6)]
GROUPS = {d: "bench" for d in IDS}


@pytest.fixture
def bench_broker() -> Iterator[Broker]:
    """The bench's mosquitto: a password for each of IDS and one server user, anonymous clients refused."""
    broker = start_broker(IDS, servers=1)
    yield broker
    broker.cleanup()


@pytest.fixture
def server(bench_broker, tmp_path) -> Iterator[Servers]:
    """bench/fleet.py's single fleet server (its own process, SQLite) with IDS enrolled, connected."""
    servers = start_single(str(tmp_path), server_broker_url(bench_broker, 0), GROUPS)
    try:
        wait_for(lambda: servers.health(0).get("broker") == "connected", 60, "the bench's server did not start")
        yield servers
    finally:
        servers.stop()


def test_simulated_devices_are_stored_and_nothing_counts_as_lost(bench_broker, server) -> None:
    devices = Devices(bench_broker.port, IDS, GROUPS)
    monitor = DropMonitor(bench_broker)
    try:
        assert sum(devices.ask("connect", 30.0)) == len(IDS)
        devices.ask("start", (1.0, 2.0))  # telemetry every second, a drift window every 2 s
        assert wait_until(lambda: stored_rows(server.db_url)["drift"] >= 2 * len(IDS), 30, step=0.5)
        sent = devices.stats("stop")["sent"]
        result = drain(server.db_url, sent, timeout=30)
        assert sent["state"] == len(IDS) and sent["drift"] >= 2 * len(IDS) and sent["telemetry"] >= 2 * len(IDS)
        assert result.complete
        assert result.lost(sent) == {k: 0 for k in TRAFFIC_KINDS}
        assert {k: result.final[k] for k in TRAFFIC_KINDS} == {k: sent[k] for k in TRAFFIC_KINDS}
        assert devices.stats()["failed"] == {}
        assert wait_until(lambda: monitor.value is not None, 10, step=0.2)
        assert monitor.value == 0
    finally:
        monitor.close()
        devices.close()


def test_the_bench_broker_refuses_a_device_with_a_wrong_password(bench_broker) -> None:
    refused: list[bool] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=IDS[0])
    c.username_pw_set(IDS[0], "not-its-password")
    c.on_connect = lambda client, userdata, flags, reason, props: refused.append(reason.is_failure)
    c.connect("127.0.0.1", bench_broker.port)
    c.loop_start()
    try:
        assert wait_until(lambda: bool(refused), 10)
        assert refused == [True]
    finally:
        c.loop_stop()
