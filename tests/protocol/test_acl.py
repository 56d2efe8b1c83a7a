"""Topics.acl_lines in a real mosquitto with per-device passwords: a device only reaches its own topics."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.mqtt_link import MqttLink
from toco_core.messages import DeployCommand, MessageKind, Phase, StatusMessage, encode, encode_part
from toco_core.topics import Topics

from .conftest import Broker, wait_until

T = Topics("plant1")
BID = "cd" * 32


def client(port: int, user: str, password: str, client_id: str, seen: list | None = None) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    c.username_pw_set(user, password)
    ready = threading.Event()
    c.on_connect = lambda cl, u, f, rc, p: ready.set() if not rc.is_failure else None
    if seen is not None:
        c.on_message = lambda cl, u, m: seen.append((m.topic, bytes(m.payload)))
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert ready.wait(5), f"{user} could not connect"
    return c


@pytest.fixture
def secured_broker():
    auth = Path(tempfile.mkdtemp(prefix="toco-auth-"))
    os.chmod(auth, 0o755)
    passwd, acl = auth / "passwd", auth / "acl"
    for i, (user, pw) in enumerate([("toco-server", "s3rver"), ("cam-07", "pw7"), ("cam-08", "pw8")]):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, pw], check=True)
    acl.write_text("\n".join(T.acl_lines("toco-server")) + "\n")
    for f in (passwd, acl):
        os.chmod(f, 0o644)
    b = Broker(security=["allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}"])
    b.start()
    yield b
    b.cleanup()
    shutil.rmtree(auth, ignore_errors=True)


def test_device_acl(secured_broker, tmp_path) -> None:
    port = secured_broker.port
    server_seen: list = []
    server = client(port, "toco-server", "s3rver", "toco-server", server_seen)
    server.subscribe(f"{T.prefix}/#", 1)
    time.sleep(0.2)

    link = MqttLink(url=f"mqtt://cam-07:pw7@127.0.0.1:{port}", fleet="plant1", device_id="cam-07", state_dir=tmp_path)
    commands: list = []
    link.on(T.device(MessageKind.CMD, "cam-07"), MessageKind.CMD, lambda t, m: commands.append(m))
    link.start()
    assert link.wait_connected(5)
    assert wait_until(lambda: any(t == T.device("state", "cam-07") for t, _ in server_seen), 5)

    device_seen: list = []
    rogue = client(port, "cam-07", "pw7", "cam-07-rogue", device_seen)  # cam-07's credentials, any client id
    rogue.subscribe([(T.device("cmd", "cam-08"), 1), (T.device("cmd", "cam-07"), 1)])
    time.sleep(0.2)
    status8 = encode(StatusMessage(device_id="cam-08", phase=Phase.ACTIVE))
    for topic in (T.device("status", "cam-08"), T.device("cmd", "cam-07"), T.chunk(BID, 0), T.get(BID, "cam-08")):
        rogue.publish(topic, status8, qos=1).wait_for_publish(5)
    rogue.publish(T.device("status", "cam-07"), b"control", qos=1).wait_for_publish(5)  # allowed: arrives last
    assert wait_until(lambda: any(p == b"control" for _, p in server_seen), 5)
    assert not any(p == status8 for _, p in server_seen), "a device wrote outside its own topics"

    for dev in ("cam-08", "cam-07"):
        cmd = DeployCommand(cmd_id=f"c-{dev}", deployment_id="d", bundle_id=BID)
        server.publish(T.device("cmd", dev), encode(cmd), qos=1).wait_for_publish(5)
    assert wait_until(lambda: len(commands) == 1 and any("c-cam-07" in p.decode() for _, p in device_seen), 5)
    assert commands[0].cmd_id == "c-cam-07"
    assert not any("c-cam-08" in p.decode() for _, p in device_seen), "a device read another device's commands"

    # part replies: the asker reads its own part topic only
    rogue.subscribe([(T.part(BID, "cam-08"), 0), (T.part(BID, "cam-07"), 0)])
    time.sleep(0.2)
    for dev in ("cam-08", "cam-07"):
        server.publish(T.part(BID, dev), encode_part(BID, "head", 0, dev.encode()), qos=1).wait_for_publish(5)
    assert wait_until(lambda: any(t == T.part(BID, "cam-07") for t, _ in device_seen), 5)
    assert not any(t == T.part(BID, "cam-08") for t, _ in device_seen), "a device read another device's parts"

    wrong = MqttLink(url=f"mqtt://cam-08:nope@127.0.0.1:{port}", fleet="plant1", device_id="cam-08",
                     state_dir=tmp_path / "wrong")
    wrong.start()
    assert not wrong.wait_connected(1.0)
    wrong.stop()
    link.stop()
    for c in (rogue, server):
        c.disconnect()
        c.loop_stop()
