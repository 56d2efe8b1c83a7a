"""A replica SIGKILLed and not restarted strands no device message (all are QoS 1, telemetry included):
mosquitto keeps routing its share of the shared subscriptions into its broker-held session, and the surviving
replica, once the dead one's database session has been gone for the grace period, takes that MQTT session over,
stores what waited there (once) and ends it, so later messages go to the live replica only. The killed replica,
restarted afterwards under the same MQTT user (client id = username, as shipped), starts a new session and gets
its share again."""

from __future__ import annotations

import signal
import threading
import time

import sqlalchemy as sa

from fleet_server.db import Database
from fleet_server.enrollment import enroll
from tests.fleet.test_ack_after_commit import drift
from tests.fleet.test_replicas import Device, Replica, replica_args
from tests.fleet.test_replicas import broker as broker  # noqa: F401 - the module's fixture, used below
from tests.support.waiting import wait_until
from toco_core.messages import MessageKind

CAMS = ("cam-1", "cam-2", "cam-3")
ENV = {"TOCO_FLEET_SESSION_DRAIN_GRACE_S": "1", "TOCO_FLEET_TELEMETRY_KEEP": "10000"}  # every point stays to be counted


def received(replica: Replica) -> int:
    return replica.health().get("messages", {}).get("received.drift", 0)


def drift_rows(engine: sa.Engine) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text('SELECT device_id, "window" FROM drift_reports'))]


T0 = float(int(time.time()))  # telemetry of window w is sent at T0 + w (recent: retention keeps it)


def telemetry_rows(engine: sa.Engine) -> list[tuple[str, int]]:
    """(device, window) of every stored telemetry point: the test sends one per drift window."""
    with engine.connect() as conn:
        return [(d, int(t - T0)) for d, t in conn.execute(sa.text("SELECT device_id, t FROM telemetry"))]


def test_a_killed_replicas_queued_messages_are_drained_by_the_survivor(broker, pg_url, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    db = Database(pg_url)
    for cam in CAMS:
        enroll(db, cam, "line")
    db.close()
    engine = sa.create_engine(pg_url)
    env = {**ENV, "TOCO_FLEET_MQTT_PEER_PASSWORD_DIR": str(tmp_path)}  # replica_args writes {user}.password there
    first = Replica(tmp_path, "r1", *replica_args(broker, data, pg_url, "toco-server", "r1"), env=env)
    replicas, devices = [first], []
    try:
        assert wait_until(lambda: first.health().get("broker") == "connected", 30, 0.2), first.output()
        second = Replica(tmp_path, "r2", *replica_args(broker, data, pg_url, "toco-server-2", "r2"), env=env)
        replicas.append(second)
        assert wait_until(lambda: second.health().get("broker") == "connected", 30, 0.2), second.output()
        devices = [Device(broker.port, cam) for cam in CAMS]
        sent: set[tuple[str, int]] = set()

        def send(start: int, n: int) -> None:  # a drift report and a telemetry point per device and window
            for d in devices:
                for window in range(start, start + n):
                    d.publish(MessageKind.DRIFT, drift(d.id, window))
                    d.telemetry([T0 + window])
                    sent.add((d.id, window))

        send(0, 6)  # both replicas up: shared between them
        assert wait_until(lambda: len(drift_rows(engine)) == len(sent), 15, 0.1)
        assert received(first) and received(second), "both replicas take a share"

        # the leader dies and is not restarted; devices keep sending: the broker queues part of it for r1
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        killed_at = time.monotonic()
        send(100, 10)
        # and go on sending during the drain (each stored report is an event the survivor relays: the drain
        # must not wait on those)
        steady = threading.Event()

        def keep_sending() -> None:
            window = 1000
            while not steady.is_set():
                send(window, 1)
                window += 1
                time.sleep(0.2)

        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        try:
            assert wait_until(lambda: second.health().get("replica", {}).get("leader"), 10, 0.1), second.output()
            assert wait_until(lambda: second.health()["replica"]["drained_sessions"], 25, 0.2), second.output()
        finally:
            steady.set()
            sender.join(10)
        drained = second.health()["replica"]["drained_sessions"]
        assert [(d["replica"], d["session_present"]) for d in drained] == [("r1", True)], drained
        assert drained[0]["messages"] > 0, f"nothing waited in the dead session: the test shows nothing {drained}"
        before = received(second)
        send(200, 10)  # after the drain the broker routes all of it to the live replica
        assert wait_until(lambda: received(second) - before == 10 * len(CAMS), 10, 0.1), (received(second), before)
        assert wait_until(lambda: len(drift_rows(engine)) >= len(sent), 10, 0.1), \
            (len(drift_rows(engine)), len(sent), second.output())
        took = time.monotonic() - killed_at
        time.sleep(0.5)  # a duplicate delivered late would land now
        assert sorted(drift_rows(engine)) == sorted(sent), "each message stored exactly once"
        assert sorted(telemetry_rows(engine)) == sorted(sent), "each telemetry point stored exactly once"
        assert took < 20, f"stored {took:.1f} s after the kill"
        assert "draining the MQTT session of a dead replica" in second.output()

        # r1 comes back under its user: a new session, its share of the shared subscriptions again
        third = Replica(tmp_path, "r1-again", *replica_args(broker, data, pg_url, "toco-server", "r1"), env=env)
        replicas.append(third)
        assert wait_until(lambda: third.health().get("broker") == "connected", 30, 0.2), third.output()
        send(300, 10)
        assert wait_until(lambda: len(drift_rows(engine)) >= len(sent), 10, 0.1)
        time.sleep(0.5)
        assert sorted(drift_rows(engine)) == sorted(sent), "each message stored exactly once"
        assert sorted(telemetry_rows(engine)) == sorted(sent), "each telemetry point stored exactly once"
        assert received(third) > 0, "the restarted replica gets its share again"
        time.sleep(2)  # more than the grace period with r1 alive again: the leader leaves its session alone
        assert len(second.health()["replica"]["drained_sessions"]) == 1, second.health()["replica"]
    finally:
        for d in devices:
            d.close()
        for r in replicas:
            r.stop()
        engine.dispose()
