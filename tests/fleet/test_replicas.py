"""Several ``toco-fleet serve --replicas`` processes on one throw-away PostgreSQL and one real mosquitto
(passwords, the generated ACL, ``use_username_as_clientid`` as shipped): each device message is stored
once, exactly one replica leads the singleton duties, a killed leader is replaced within seconds (its
retention duty then runs on the survivor), every replica's browsers get every event, and a second serve
on one SQLite data dir, or replicas on SQLite or the embedded broker, refuse with one clear line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa

from fleet_server.auth import create_token
from fleet_server.db import Database
from fleet_server.enrollment import enroll
from tests.support.broker import Broker
from tests.support.processes import free_port, stop_process
from tests.support.waiting import wait_until
from toco_core.messages import MessageKind, StateMessage, TelemetryMessage, encode
from toco_core.topics import DELIVERY, Topics

REPO = Path(__file__).resolve().parents[2]
FLEET, KEEP = "test", 10
T = Topics(FLEET)
USERS = ("toco-server", "toco-server-2", "cam-1", "cam-2", "cam-3")


@pytest.fixture(scope="module")
def broker():
    """mosquitto with a password per user, the generated ACL (two server users) and client id = username."""
    d = Path(tempfile.mkdtemp(prefix="toco-replica-mosq-"))  # mosquitto drops root: not under pytest's 0700 tmp
    passwd, acl = d / "passwd", d / "acl"
    passwd.touch()
    for user in USERS:
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, f"pw-{user}"], check=True, capture_output=True)
    acl.write_text("\n".join(T.acl_lines("toco-server", "toco-server-2")) + "\n")
    for p in (d, passwd, acl):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    b = Broker(["allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}", "use_username_as_clientid true"])
    b.start()
    yield b
    b.cleanup()
    shutil.rmtree(d, ignore_errors=True)


class Replica:
    """One ``python -m fleet_server serve`` child process."""

    def __init__(self, tmp: Path, name: str, *args: str, env: dict | None = None) -> None:
        self.name, self.port = name, free_port()
        self.log = open(tmp / f"{name}.log", "w+b")  # noqa: SIM115 - the serve process writes it
        env = {**os.environ, "PYTHONPATH": str(REPO), "TOCO_FLEET_TICK_S": "0.2", "TOCO_FLEET_LEASE_CHECK_S": "0.5",
               "TOCO_FLEET_RETENTION_INTERVAL_S": "0.5", "TOCO_FLEET_TELEMETRY_KEEP": str(KEEP), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "fleet_server", "serve", "--fleet", FLEET, "--port",
                                      str(self.port), *args], env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def health(self) -> dict:
        """GET /api/health (public); {} while it does not answer."""
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


def replica_args(broker: Broker, data: Path, pg_url: str, user: str, replica_id: str) -> list[str]:
    pw = data.parent / f"{user}.password"
    pw.write_text(f"pw-{user}\n")
    return ["--data-dir", str(data), "--db-url", pg_url, "--broker", broker.url, "--mqtt-username", user,
            "--mqtt-password-file", str(pw), "--replicas", "--replica-id", replica_id]


class Device:
    """A device with its own broker credentials: a birth, then telemetry at QoS 1 (a duplicate would show)."""

    def __init__(self, port: int, device_id: str) -> None:
        self.id = device_id
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
        self.c.username_pw_set(device_id, f"pw-{device_id}")
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.publish(MessageKind.STATE, StateMessage(device_id=device_id, state="online", birth=1, group="line"))

    def publish(self, kind: MessageKind, msg) -> None:
        rule = DELIVERY[kind]
        info = self.c.publish(T.device(kind, self.id), encode(msg), qos=rule.qos, retain=rule.retain)
        info.wait_for_publish(5)

    def telemetry(self, times: list[float]) -> None:
        for t in times:
            self.publish(MessageKind.TELEMETRY, TelemetryMessage(device_id=self.id, mem_available=1 << 20,
                                                                 disk_free=1 << 30, cpu_load=0.1, sent_at=t))

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class EventStream:
    """GET /api/events of one replica, read on a thread: the telemetry events its browsers would get."""

    def __init__(self, port: int, token: str) -> None:
        self.telemetry: list[tuple[str, float]] = []
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                                   timeout=httpx.Timeout(5, read=None))
        self.open = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.open.wait(5), "the event stream did not open"

    def _read(self) -> None:
        try:
            with self.client.stream("GET", "/api/events") as r:
                kind = None
                for line in r.iter_lines():
                    self.open.set()
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "telemetry":
                        data = json.loads(line[6:])
                        self.telemetry.append((data["device_id"], data["t"]))
        except httpx.HTTPError:
            pass

    def close(self) -> None:
        self.client.close()


def telemetry_rows(engine: sa.Engine) -> list[tuple[str, float]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT device_id, t FROM telemetry"))]


def test_two_replicas_share_ingest_elect_one_leader_and_take_over(broker, pg_url, tmp_path):
    data = tmp_path / "data"  # shared: models, bundles and the signing key are files
    db = Database(pg_url)  # the schema, a token and the enrolled devices, as `toco-fleet` would make them
    token, _ = create_token(db, role="admin", name="tests")
    for cam in ("cam-1", "cam-2", "cam-3"):
        enroll(db, cam, "line")
    db.close()
    engine = sa.create_engine(pg_url)
    first = Replica(tmp_path, "r1", *replica_args(broker, data, pg_url, "toco-server", "r1"))
    replicas, devices, streams = [first], [], []
    try:
        assert wait_until(lambda: first.health().get("broker") == "connected", 30, 0.2), first.output()
        second = Replica(tmp_path, "r2", *replica_args(broker, data, pg_url, "toco-server-2", "r2"))
        replicas.append(second)
        assert wait_until(lambda: second.health().get("broker") == "connected", 30, 0.2), second.output()
        leaders = [r.name for r in replicas if r.health()["replica"]["leader"]]
        assert leaders == ["r1"], leaders  # the first one up took the lease; the second follows

        # a third replica under an MQTT user another one holds would kick it off the broker: refused
        clash = Replica(tmp_path, "r3", *replica_args(broker, data, pg_url, "toco-server-2", "r3"))
        assert clash.proc.wait(30) != 0
        assert "another replica already connects to the broker as 'toco-server-2'" in clash.output(), clash.output()
        clash.stop()

        log = httpx.get(f"http://127.0.0.1:{second.port}/api/event-log", params={"kind": "enrollment"},
                        headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert sorted(e["data"]["device_id"] for e in log.json()) == ["cam-1", "cam-2", "cam-3"], log.text
        streams = [EventStream(r.port, token) for r in replicas]
        devices = [Device(broker.port, cam) for cam in ("cam-1", "cam-2", "cam-3")]
        base = time.time() - 1000
        sent = {(d.id, base + 100 * i + k) for i, d in enumerate(devices) for k in range(8)}
        for i, d in enumerate(devices):
            d.telemetry([base + 100 * i + k for k in range(8)])
        assert wait_until(lambda: len(telemetry_rows(engine)) >= len(sent), 20, 0.1), \
            (len(telemetry_rows(engine)), [r.health()["messages"] for r in replicas])
        time.sleep(0.5)  # a duplicate delivered late would land now
        rows = telemetry_rows(engine)
        assert sorted(rows) == sorted(sent), "each message stored exactly once"
        stored = [r.health()["messages"].get("received.telemetry", 0) for r in replicas]
        assert sum(stored) == len(sent) and all(stored), f"the broker shares ingest out: {stored}"
        for s in streams:  # each replica's browsers see every point, whichever replica stored it
            assert wait_until(lambda s=s: {x for x in s.telemetry if x[0].startswith("cam")} >= sent, 10), \
                (len(s.telemetry), len(sent))

        # retention (a leader duty) keeps the newest KEEP points of cam-1
        devices[0].telemetry([base + 50 + k for k in range(6)])
        assert wait_until(lambda: sum(1 for r in telemetry_rows(engine) if r[0] == "cam-1") == KEEP, 10, 0.2)
        kept = sorted(t for dev, t in telemetry_rows(engine) if dev == "cam-1")
        assert kept == sorted([base + k for k in range(8)] + [base + 50 + k for k in range(6)])[-KEEP:]

        # the leader dies: the other one takes the lease within seconds and runs the duty
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        t0 = time.monotonic()
        assert wait_until(lambda: second.health().get("replica", {}).get("leader"), 10, 0.1), second.output()
        took = time.monotonic() - t0
        assert took < 5, f"the take-over took {took:.1f} s"
        devices[1].telemetry([base + 150 + k for k in range(6)])
        assert wait_until(lambda: sum(1 for r in telemetry_rows(engine) if r[0] == "cam-2") == KEEP, 10, 0.2)
        assert sum(1 for r in telemetry_rows(engine) if r[0] == "cam-1") == KEEP
    finally:
        for s in streams:
            s.close()
        for d in devices:
            d.close()
        for r in replicas:
            r.stop()
        engine.dispose()


def test_a_second_serve_on_one_sqlite_data_dir_refuses(tmp_path):
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--broker-port"]
    first = Replica(tmp_path, "solo", *args, str(free_port()))
    try:
        assert wait_until(lambda: first.health().get("status") == "ok", 30, 0.2), first.output()
        second = Replica(tmp_path, "again", *args, str(free_port()))
        assert second.proc.wait(30) != 0
        out = second.output()
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert errors and "another toco-fleet serve (pid" in errors[0] and str(data) in errors[0], out
        assert "Traceback" not in out, out
        second.stop()
        assert first.health().get("status") == "ok"  # the first one never noticed
    finally:
        first.stop()


@pytest.mark.parametrize("args, message", [
    (["--replicas"], "replicas need a shared PostgreSQL database, not SQLite"),
    (["--replicas", "--db-url", "postgresql+psycopg://u@127.0.0.1:1/x"], "replicas need one external broker"),
])
def test_replicas_on_sqlite_or_the_embedded_broker_are_refused(tmp_path, args, message):
    from typer.testing import CliRunner

    from fleet_server.cli import app

    out = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path), *args])
    assert out.exit_code == 2 and out.output.startswith("error: ") and message in out.output, out.output
    assert out.output.count("\n") == 1 and not (tmp_path / "fleet.db").exists()
