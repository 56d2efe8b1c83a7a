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


def test_the_simulated_parts_fetch_keeps_the_agents_window_and_asks_again_only_after_a_silence() -> None:
    """bench._fleet_sim_fetch mirrors agent.parts_fetch: 32 ranges in flight, refilled once 16 are free, the
    ranges in flight asked for again only after 10 s without any frame, then 20 s, ...; 6 such re-requests
    without a frame give up."""
    from bench._fleet_sim_fetch import MAX_STALLS, WINDOW, SimFetch
    from toco_core.bundle import generate_private_key, make_manifest, pack_bundle

    data = pack_bundle({"head": b"h" * 1000, **{f"codes/{i}": bytes([i]) * 700 for i in range(99)},
                        "base": b"b" * 4000})
    manifest = make_manifest(data, private_key=generate_private_key())
    asked: list[list[tuple[str, int]]] = []
    fetch = SimFetch(manifest, lambda ranges: asked.append([(r.part, r.offset) for r in ranges]), now=0.0)
    assert len(fetch.ranges) == 100 and all(r.part != "base" for r in fetch.ranges)
    fetch.pump()
    assert [len(a) for a in asked] == [WINDOW]
    t = 0.0
    for key in asked[0][:15]:  # frames keep coming, 0.9 s apart: fewer than half a window free, nothing asked
        t += 0.9
        fetch.frame(key, 700, t)
        fetch.tick(t)
    assert len(asked) == 1 and fetch.rerequested == 0
    fetch.frame(asked[0][15], 700, t)  # half a window free: one refill of 16
    assert [len(a) for a in asked] == [WINDOW, WINDOW // 2]
    fetch.tick(t + 9.9)
    assert len(asked) == 2  # 9.9 s of silence: not yet
    fetch.tick(t + 12.6)  # past 10 s (+ at most a quarter): the 32 in flight asked for again
    assert [len(a) for a in asked] == [WINDOW, WINDOW // 2, WINDOW] and fetch.rerequested == WINDOW
    assert set(asked[2]) == set(asked[0][16:]) | set(asked[1])
    fetch.tick(t + 12.6 + 19.9)
    assert len(asked) == 3  # the second re-request waits 20 s
    now = t + 12.6
    for _ in range(MAX_STALLS):
        now += 80.0
        fetch.tick(now)
    assert fetch.stalled and fetch.timer.attempts == MAX_STALLS and not fetch.done
