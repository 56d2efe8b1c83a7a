"""deploy/mosquitto with a real mosquitto: shipped config, shipped ACL, passwords from add-device.sh."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from toco_core.topics import Topics

from .conftest import DEPLOY, REPO, DeployBroker

T = Topics("plant1")


class Client:
    """A plain paho client (plain or TLS listener) that records what it receives and how CONNACK went."""

    def __init__(self, broker: DeployBroker, user: str | None, password: str | None, tls: bool) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.answered = threading.Event()
        self.refused: bool | None = None
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.monotonic_ns()}",
                             protocol=mqtt.MQTTv311)
        if user is not None:
            self.c.username_pw_set(user, password)
        if tls:
            self.c.tls_set(ca_certs=str(broker.ca))
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda c, u, m: self.seen.append((m.topic, bytes(m.payload)))
        self.c.connect("127.0.0.1", broker.tls if tls else broker.plain)
        self.c.loop_start()
        assert self.answered.wait(5), "no CONNACK within 5 s"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.refused is None:
            self.refused = reason_code.is_failure
        self.answered.set()

    def subscribe(self, *topics: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe([(t, 1) for t in topics])
        assert done.wait(5)

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def payloads(self) -> list[bytes]:
        return [p for _, p in self.seen]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def wait_for(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not cond():
        time.sleep(0.02)
    return bool(cond())


@pytest.fixture
def server(deploy_broker):
    c = Client(deploy_broker, "toco-server", deploy_broker.passwords["toco-server"], tls=False)
    assert c.refused is False
    yield c
    c.close()


def device(broker: DeployBroker, name: str) -> Client:
    c = Client(broker, name, broker.passwords[name], tls=True)
    assert c.refused is False, f"{name} was refused on the TLS listener"
    return c


def test_shipped_acl_is_what_the_code_generates() -> None:
    rules = [ln for ln in (DEPLOY / "mosquitto" / "acl").read_text().splitlines() if not ln.startswith("#")]
    assert rules == T.acl_lines("toco-server")
    made = subprocess.run([str(DEPLOY / "mosquitto" / "make-acl.sh"), "plant1"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(REPO / ".venv" / "bin" / "python")}, check=True)
    assert made.stdout == (DEPLOY / "mosquitto" / "acl").read_text()
    bad = subprocess.run([str(DEPLOY / "mosquitto" / "make-acl.sh"), "no/slashes"], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(REPO / ".venv" / "bin" / "python")})
    assert bad.returncode == 1 and "not usable in MQTT topics" in bad.stderr


def test_device_cannot_read_another_devices_commands(deploy_broker, server) -> None:
    a = device(deploy_broker, "cam-07")
    a.subscribe(T.device("cmd", "cam-08"), T.device("cmd", "cam-07"), T.device("cmd", "+"))
    for dev in ("cam-08", "cam-07"):  # cam-07's own arrives last: once it is here, cam-08's had its chance
        server.publish(T.device("cmd", dev), f"cmd-for-{dev}".encode())
    assert wait_for(lambda: b"cmd-for-cam-07" in a.payloads())
    assert b"cmd-for-cam-08" not in a.payloads(), "cam-07 read cam-08's command"
    a.close()


def test_device_cannot_write_another_devices_topics(deploy_broker, server) -> None:
    server.subscribe(f"{T.prefix}/#")
    a = device(deploy_broker, "cam-07")
    bid = "ab" * 32
    forged = [T.device("state", "cam-08"), T.device("status", "cam-08"), T.device("cmd", "cam-07"),
              T.device("cmd", "cam-08"), T.get(bid, "cam-08"), T.chunk(bid, 0), T.manifest(bid)]
    for topic in forged:
        a.publish(topic, b"forged")
    a.publish(T.device("state", "cam-07"), b"own-state")
    a.publish(T.get(bid, "cam-07"), b"own-request")
    assert wait_for(lambda: b"own-request" in server.payloads())
    assert b"own-state" in server.payloads()
    assert b"forged" not in server.payloads(), f"cam-07 wrote outside its topics: {server.seen}"
    a.close()


def test_server_reads_every_device(deploy_broker, server) -> None:
    server.subscribe(f"{T.prefix}/#")
    devices = [device(deploy_broker, n) for n in ("cam-07", "cam-08")]
    for d, name in zip(devices, ("cam-07", "cam-08"), strict=True):
        d.publish(T.device("telemetry", name), f"tele-{name}".encode())
        d.publish(T.device("drift", name), f"drift-{name}".encode())
    want = {b"tele-cam-07", b"tele-cam-08", b"drift-cam-07", b"drift-cam-08"}
    assert wait_for(lambda: want <= set(server.payloads()))
    for d in devices:
        d.close()


@pytest.mark.parametrize("tls", [False, True], ids=["loopback-listener", "tls-listener"])
def test_wrong_credentials_are_refused(deploy_broker, tls) -> None:
    pw = deploy_broker.passwords
    attempts = {"wrong password": ("cam-07", pw["cam-07"] + "x"), "someone else's password": ("cam-08", pw["cam-07"]),
                "unknown user": ("cam-99", pw["cam-07"]), "anonymous": (None, None)}
    for what, (user, password) in attempts.items():
        c = Client(deploy_broker, user, password, tls=tls)
        assert c.refused is True, f"{what} was accepted"
        c.close()
    ok = Client(deploy_broker, "cam-07", pw["cam-07"], tls=tls)
    assert ok.refused is False
    ok.close()
