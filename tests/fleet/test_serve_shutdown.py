"""``toco-fleet serve`` ends within seconds of SIGTERM, whatever the broker is doing: a real serve process
on a real mosquitto, with a dashboard's event stream open and device messages still arriving; with the
broker stopped (the server reconnecting); and with the broker frozen (SIGSTOP: connected, answering nothing).
Each time the process exits within 10 s, with the exit status of a SIGTERM and no traceback."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from fleet_server.auth import create_token
from fleet_server.db import Database
from tests.fleet.test_replicas import FLEET, EventStream, Replica
from tests.support.broker import Broker
from tests.support.waiting import wait_until
from toco_core.messages import MessageKind, TelemetryMessage, encode
from toco_core.topics import Topics

T = Topics(FLEET)
EXIT_WITHIN_S = 10.0
SIGTERM_STATUS = 128 + signal.SIGTERM  # fleet_server.serve_process._exit_on_sigterm


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker(["allow_anonymous true"])
    b.start()
    yield b
    b.cleanup()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    """SQLite in the serve's data dir, or a new database on the session's PostgreSQL cluster (the lease's
    sessions and threads are then part of the stop too)."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    (tmp_path / "data").mkdir()
    return f"sqlite:///{(tmp_path / 'data' / 'fleet.db').resolve()}"


def start_serve(tmp_path, broker: Broker, db_url: str) -> tuple[Replica, str]:
    """A serve on ``db_url`` and the external broker, connected; and an admin API token."""
    data = tmp_path / "data"
    db = Database(db_url)
    token, _ = create_token(db, role="admin", name="tests")
    db.close()
    serve = Replica(tmp_path, "serve", "--data-dir", str(data), "--broker", broker.url, "--db-url", db_url)
    assert wait_until(lambda: serve.health().get("broker") == "connected", 30, 0.2), serve.output()
    return serve, token


def sigterm_and_time(serve: Replica) -> tuple[float, int | None]:
    """SIGTERM the serve; (seconds until it exited, its exit status; None if it had not after EXIT_WITHIN_S)."""
    t0 = time.monotonic()
    serve.proc.send_signal(signal.SIGTERM)
    try:
        code = serve.proc.wait(EXIT_WITHIN_S)
    except Exception:  # noqa: BLE001 - TimeoutExpired: reported by the caller's assertion
        code = None
    return time.monotonic() - t0, code


class Flood:
    """A device client publishing telemetry as fast as it can (QoS 1: the broker holds what the server lags)."""

    def __init__(self, port: int) -> None:
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flood", protocol=mqtt.MQTTv311)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self._stop = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for i in range(200):
                msg = TelemetryMessage(device_id=f"flood-{i}", mem_available=1 << 20, disk_free=1 << 30,
                                       cpu_load=0.1, sent_at=time.time())
                self.c.publish(T.device(MessageKind.TELEMETRY, f"flood-{i}"), encode(msg), qos=1)
                self.sent += 1
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.c.disconnect()
        self.c.loop_stop()


def test_serve_exits_within_seconds_of_sigterm_with_a_dashboard_stream_open_under_traffic(broker, db_url, tmp_path):
    serve, token = start_serve(tmp_path, broker, db_url)
    stream = flood = None
    try:
        stream = EventStream(serve.port, token)  # a dashboard's live updates: a response that never ends
        flood = Flood(broker.port)
        assert wait_until(lambda: serve.health().get("messages", {}).get("received.telemetry", 0) > 500, 30, 0.2)
        took, code = sigterm_and_time(serve)
        assert code == SIGTERM_STATUS, f"exit status {code} after {took:.1f} s\n{serve.output()[-3000:]}"
        assert took < EXIT_WITHIN_S
        assert "Traceback" not in serve.output(), serve.output()
        print(f"exited {took:.1f} s after SIGTERM (stream open, {flood.sent} messages flooding)")
    finally:
        if flood is not None:
            flood.close()
        if stream is not None:
            stream.close()
        serve.stop()


def test_serve_exits_within_seconds_of_sigterm_with_the_broker_stopped(broker, db_url, tmp_path):
    serve, _ = start_serve(tmp_path, broker, db_url)
    try:
        broker.stop()
        assert wait_until(lambda: serve.health().get("broker") == "disconnected", 15, 0.2), serve.output()
        time.sleep(2)  # reconnecting, with backoff
        took, code = sigterm_and_time(serve)
        assert code == SIGTERM_STATUS, f"exit status {code} after {took:.1f} s\n{serve.output()[-3000:]}"
        assert took < EXIT_WITHIN_S
        assert "Traceback" not in serve.output(), serve.output()
        print(f"exited {took:.1f} s after SIGTERM (broker stopped)")
    finally:
        serve.stop()


def test_serve_exits_within_seconds_of_sigterm_with_the_broker_frozen(broker, db_url, tmp_path):
    serve, _ = start_serve(tmp_path, broker, db_url)
    frozen = False
    try:
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)  # connected, but it reads and answers nothing
        frozen = True
        time.sleep(1)
        took, code = sigterm_and_time(serve)
        assert code == SIGTERM_STATUS, f"exit status {code} after {took:.1f} s\n{serve.output()[-3000:]}"
        assert took < EXIT_WITHIN_S
        assert "Traceback" not in serve.output(), serve.output()
        print(f"exited {took:.1f} s after SIGTERM (broker frozen)")
    finally:
        if frozen and broker.proc is not None:
            broker.proc.send_signal(signal.SIGCONT)
        serve.stop()
