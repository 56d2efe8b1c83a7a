"""Client-id takeover on the shipped mosquitto config (deploy/mosquitto/toco.conf, real mosquitto,
passwords from add-device.sh): a device with valid credentials cannot kick another device or the
fleet server off by connecting under its client id, nor wipe a device's queued commands with a
clean session under its id. ``use_username_as_clientid`` on both listeners makes every client id
the authenticated username."""

from __future__ import annotations

import signal
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from fleet_server.cli import app
from tests.deploy.conftest import DeployBroker
from toco_core.topics import Topics

T = Topics("plant1")
SERVER_CLIENT_ID = "toco-fleet-plant1"  # what FleetServer asks for (toco-fleet-{fleet})


class Session:
    """A paho client with a chosen client id; records messages and every disconnect."""

    def __init__(self, broker: DeployBroker, user: str, client_id: str, *, tls: bool, clean: bool = True,
                 subscribe: str | None = None) -> None:
        self.seen: list[bytes] = []
        self.drops = 0
        self.up = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                             protocol=mqtt.MQTTv311)
        self.c.username_pw_set(user, broker.passwords[user])
        if tls:
            self.c.tls_set(ca_certs=str(broker.ca))
        self.c.reconnect_delay_set(5, 5)  # a kicked client must not be back before the check looks
        self.subscribe = subscribe
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = lambda c, u, m: self.seen.append(bytes(m.payload))
        self.c.connect("127.0.0.1", broker.tls if tls else broker.plain)
        self.c.loop_start()
        assert self.up.wait(5), f"{user} as {client_id!r} got no CONNACK"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        assert not reason_code.is_failure, f"refused: {reason_code}"
        if self.subscribe:
            client.subscribe(self.subscribe, 1)
        self.up.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.drops += 1

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def publish(broker: DeployBroker, topic: str, payload: bytes) -> None:
    """Publish one QoS 1 message as the fleet server user (the ACL lets it write every command)."""
    s = Session(broker, "toco-server", f"pub-{time.monotonic_ns()}", tls=False)
    s.c.publish(topic, payload, qos=1).wait_for_publish(5)
    s.close()


def wait_for(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not cond():
        time.sleep(0.02)
    return bool(cond())


@pytest.mark.parametrize("tls", [True, False], ids=["tls-listener", "loopback-listener"])
def test_a_device_cannot_kick_another_device_off(deploy_broker, tls):
    victim = Session(deploy_broker, "cam-07", "cam-07", tls=True, subscribe=T.device("cmd", "cam-07"))
    time.sleep(0.2)  # the subscription is in place
    attacker = Session(deploy_broker, "cam-08", "cam-07", tls=tls)
    time.sleep(0.5)  # a takeover disconnects the victim at once
    assert victim.drops == 0, "cam-08 kicked cam-07 off by connecting with its client id"
    publish(deploy_broker, T.device("cmd", "cam-07"), b"still-yours")
    assert wait_for(lambda: b"still-yours" in victim.seen)
    attacker.close()
    victim.close()


@pytest.mark.parametrize("client_id", [SERVER_CLIENT_ID, "toco-server"])
@pytest.mark.parametrize("tls", [True, False], ids=["tls-listener", "loopback-listener"])
def test_a_device_cannot_take_the_servers_client_id(deploy_broker, client_id, tls):
    server = Session(deploy_broker, "toco-server", SERVER_CLIENT_ID, tls=False, subscribe=f"{T.prefix}/devices/+/state")
    time.sleep(0.2)
    attacker = Session(deploy_broker, "cam-08", client_id, tls=tls)
    time.sleep(0.5)
    assert server.drops == 0, f"cam-08 kicked the fleet server off by connecting as {client_id!r}"
    attacker.c.publish(T.device("state", "cam-08"), b"cam-08-birth", qos=1).wait_for_publish(5)
    assert wait_for(lambda: b"cam-08-birth" in server.seen), "the server no longer hears the devices"
    attacker.close()
    server.close()


def test_a_clean_session_under_another_id_cannot_wipe_queued_commands(deploy_broker):
    cmd = T.device("cmd", "cam-07")
    victim = Session(deploy_broker, "cam-07", "cam-07", tls=True, clean=False, subscribe=cmd)
    time.sleep(0.2)
    victim.close()  # offline: its persistent session queues its QoS 1 commands
    publish(deploy_broker, cmd, b"queued-while-offline")
    wiper = Session(deploy_broker, "cam-08", "cam-07", tls=True, clean=True)
    wiper.close()
    back = Session(deploy_broker, "cam-07", "cam-07", tls=True, clean=False)
    assert wait_for(lambda: b"queued-while-offline" in back.seen), "cam-08's clean session wiped cam-07's commands"
    back.close()


def test_enroll_and_revoke_take_effect_on_the_running_broker(deploy_broker, tmp_path):
    """`toco-fleet devices enroll/revoke --passwd` on the broker's password file, then a SIGHUP (what
    --reload asks systemd for): the new device gets in, and once revoked it is cut off and stays out."""
    passwd, pw = deploy_broker.root / "etc" / "passwd", tmp_path / "cam-09.password"
    data = ["--data-dir", str(tmp_path)]
    r = CliRunner().invoke(app, ["devices", "enroll", "cam-09", "--group", "line-1", "--passwd", str(passwd),
                                 "--out", str(pw), *data])
    assert r.exit_code == 0, r.output
    deploy_broker.proc.send_signal(signal.SIGHUP)
    deploy_broker.passwords["cam-09"] = pw.read_text().strip()
    assert wait_for(lambda: _accepted(deploy_broker, "cam-09"), 5), "the enrolled device was refused"
    device = Session(deploy_broker, "cam-09", "cam-09", tls=True)
    r = CliRunner().invoke(app, ["devices", "revoke", "cam-09", "--passwd", str(passwd), *data])
    assert r.exit_code == 0, r.output
    deploy_broker.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: device.drops >= 1), "the revoked device stayed connected after the reload"
    device.close()
    assert not _accepted(deploy_broker, "cam-09"), "the revoked device got back in"


def _accepted(broker: DeployBroker, user: str) -> bool:
    answer: dict = {}
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, broker.passwords[user])
    c.tls_set(ca_certs=str(broker.ca))

    def on_connect(cl, u, f, rc, p):
        answer.setdefault("ok", not rc.is_failure)
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", broker.tls)
    c.loop_start()
    done.wait(5)
    c.disconnect()
    c.loop_stop()
    return answer.get("ok", False)
