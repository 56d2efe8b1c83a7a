"""The agent's MQTT link against a real mosquitto: birth/will, sequence numbers, outbox, bad payloads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from agent.bundle_download import BundleDownloader
from agent.mqtt_link import MqttLink
from fleet_server.bundle_publisher import MqttBundleServer
from toco_core.bundle import generate_private_key, make_manifest, pack_bundle
from toco_core.messages import (
    DeployCommand,
    DriftMessage,
    HardwareInfo,
    MessageKind,
    Phase,
    StateMessage,
    StatusMessage,
    TelemetryMessage,
    encode,
    encode_chunk,
    parse_message,
)
from toco_core.topics import Topics

from .conftest import Broker, Listener, wait_until

FLEET, DEV = "plant1", "cam-07"
T = Topics(FLEET)

HARDWARE = HardwareInfo(device_id=DEV, total_memory=256 << 20, available_memory=100 << 20, free_storage=1 << 30,
                        physical_cores=1, logical_cores=1, ort_version="1.0")
CHILD = textwrap.dedent("""
    import sys, time
    from agent.mqtt_link import MqttLink
    from toco_core.messages import HardwareInfo
    HARDWARE = HardwareInfo.model_validate_json(sys.argv[3])
    link = MqttLink(url=sys.argv[1], fleet="plant1", device_id="cam-07", state_dir=sys.argv[2],
                    agent_version="child", birth=lambda: {"hardware": HARDWARE, "group": "line-1"})
    link.start()
    link.wait_connected(5)
    print("up", flush=True)
    time.sleep(60)
""")


def states(eyes: Listener) -> list[StateMessage]:
    return [parse_message("state", p) for p in eyes.on("/state")]


def test_birth_and_last_will_after_kill_9(broker, tmp_path) -> None:
    eyes = Listener(broker.port, [T.device("state")])

    def run_child() -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", CHILD, broker.url, str(tmp_path), HARDWARE.model_dump_json()],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        return p

    child = run_child()
    assert wait_until(lambda: len(states(eyes)) == 1, 5)
    born = states(eyes)[0]
    assert (born.state, born.birth, born.seq, born.agent_version) == ("online", 0, 0, "child")
    assert (born.hardware, born.group) == (HARDWARE, "line-1")
    os.kill(child.pid, signal.SIGKILL)  # no clean disconnect: the broker must publish the will
    child.wait()
    assert wait_until(lambda: len(states(eyes)) == 2, 5)
    will = states(eyes)[1]
    assert (will.state, will.birth) == ("offline", 0)
    retained = Listener(broker.port, [T.device("state")])  # a late subscriber sees the retained offline
    assert wait_until(lambda: len(states(retained)) == 1, 5) and states(retained)[0].state == "offline"
    child = run_child()
    assert wait_until(lambda: len(states(eyes)) == 3, 5)
    assert (states(eyes)[2].state, states(eyes)[2].birth) == ("online", 1)  # birth counter survives restarts
    child.kill()
    child.wait()
    eyes.close()
    retained.close()


def test_clean_stop_publishes_offline_and_seq_counts_up(broker, tmp_path) -> None:
    eyes = Listener(broker.port, [f"{T.prefix}/devices/+/+"])
    link = MqttLink(url=broker.url, fleet=FLEET, device_id=DEV, state_dir=tmp_path)
    link.start()
    assert link.wait_connected(5)
    for i in range(3):
        assert link.send(StatusMessage(device_id=DEV, phase=Phase.DOWNLOADING, progress=i / 3))
    assert link.send(TelemetryMessage(device_id=DEV, mem_available=1, disk_free=1, cpu_load=0.5))
    assert wait_until(lambda: len(eyes.on("/telemetry")) == 1 and len(eyes.on("/status")) == 3, 5)
    seqs = [parse_message("status", p).seq for p in eyes.on("/status")]
    assert seqs == [1, 2, 3] and parse_message("telemetry", eyes.on("/telemetry")[0]).seq == 4
    with pytest.raises(Exception, match="another|device"):
        link.send(StatusMessage(device_id="someone-else", phase=Phase.ACTIVE))
    assert wait_until(lambda: link.outbox_size() == 0, 5)
    link.stop()
    assert wait_until(lambda: [s.state for s in states(eyes)] == ["online", "offline"], 5)
    eyes.close()


def test_outbox_survives_broker_outage_and_restart(tmp_path) -> None:
    broker = Broker()  # not started yet: the agent is offline
    try:
        link = MqttLink(url=broker.url, fleet=FLEET, device_id=DEV, state_dir=tmp_path, reconnect_min=0.2)
        link.start()
        for i in range(4):
            link.send(StatusMessage(device_id=DEV, phase=Phase.DOWNLOADING, progress=i / 4, deployment_id="d1"))
        link.send(DriftMessage(device_id=DEV, window_index=9, opened_at=0, closed_at=60, n_samples=100,
                               mean_confidence=0.5, mean_entropy=1.0, input_mean=0.1, input_std=0.3, alert=True))
        assert not link.send(TelemetryMessage(device_id=DEV, mem_available=1, disk_free=1, cpu_load=0.1))
        assert link.outbox_size() == 5
        link.stop()  # the agent restarts while still offline

        broker.start()
        eyes = Listener(broker.port, [f"{T.prefix}/devices/+/+"])
        again = MqttLink(url=broker.url, fleet=FLEET, device_id=DEV, state_dir=tmp_path, reconnect_min=0.2)
        again.start()
        assert wait_until(lambda: len(eyes.on("/status")) == 4 and len(eyes.on("/drift")) == 1, 10)
        progress = [parse_message("status", p).progress for p in eyes.on("/status")]
        assert progress == [0, 0.25, 0.5, 0.75]  # in the order they were queued
        assert parse_message("drift", eyes.on("/drift")[0]).alert
        assert wait_until(lambda: again.outbox_size() == 0, 5)
        assert states(eyes)[0].birth == 1  # the offline run's birth was 0
        again.stop()
        eyes.close()
    finally:
        broker.cleanup()


def test_malformed_payloads_on_every_subscribed_topic_are_dropped(broker, tmp_path) -> None:
    key = generate_private_key()
    data = pack_bundle({"model.onnx": os.urandom(300_000)})
    manifest = make_manifest(data, 64 * 1024, key)
    release = threading.Event()
    server = MqttBundleServer(broker.url, FLEET, fault=lambda b, i, p: p if release.is_set() or i == 0 else None)
    server.start()
    server.publisher.announce(manifest, data)

    link = MqttLink(url=broker.url, fleet=FLEET, device_id=DEV, state_dir=tmp_path)
    commands, done = [], threading.Event()
    link.on(T.device(MessageKind.CMD, DEV), MessageKind.CMD, lambda t, m: commands.append(m))
    link.on(T.device(MessageKind.STATE, "boom"), MessageKind.STATE, lambda t, m: 1 / 0)  # a buggy handler
    dl = BundleDownloader(link, tmp_path, key.public_key(), lambda m, d: done.set(), request_timeout=1.0)
    link.start()
    assert link.wait_connected(5)
    dl.download(manifest.bundle_id)
    assert wait_until(lambda: dl.progress(manifest.bundle_id) == (1, manifest.n_chunks), 5)

    bid = manifest.bundle_id
    garbage = [b"\x00\xff", b"not json", b"[]", b"{}", b'{"schema_version": 99}', b"9" * 5000, b"{" * 100_000]
    bad = {T.device(MessageKind.CMD, DEV): garbage + [
               json.dumps({"command": "format-disk", "cmd_id": "x"}).encode(),
               encode(DeployCommand(cmd_id="c1", deployment_id="d", bundle_id=bid))[:-1] + b',"x":1}'],
           T.manifest(bid): garbage + [encode(manifest.model_copy(update={"size": 1}))],
           T.chunk(bid, 1): garbage + [b"{}\n", encode_chunk(bid, 1, b"short"), encode_chunk("ab" * 32, 1, b"x"),
                                       b'{"bundle_id":"' + bid.encode() + b'","index":"one"}\nxx'],
           T.chunk(bid, 99): [encode_chunk(bid, 99, b"x" * 100)],
           T.device(MessageKind.STATE, "boom"): [encode(StateMessage(device_id="boom", state="online", birth=0))]}
    eyes = Listener(broker.port, [])
    for topic, payloads in bad.items():
        for p in payloads:
            eyes.publish(topic, p)
    eyes.publish(T.get(bid, DEV), b"{not a request")  # and at the server
    eyes.publish(T.device(MessageKind.CMD, DEV), encode(DeployCommand(cmd_id="c2", deployment_id="d", bundle_id=bid)))
    assert wait_until(lambda: len(commands) == 1, 5) and commands[0].cmd_id == "c2"
    parsed_fine = 4  # 3 well-framed but wrong chunks (left to the downloader) + the state for the buggy handler
    assert wait_until(lambda: link.stats["dropped"] == sum(len(v) for v in bad.values()) - parsed_fine, 5)
    assert link.stats["handler_errors"] == 1
    assert dl.stats["chunk_corrupt"] >= 1 and dl.stats["chunk_ignored"] >= 1
    assert wait_until(lambda: server.publisher.stats["dropped"] == 1, 5)
    release.set()  # the download still finishes after all that
    assert done.wait(10)
    dl.close()
    link.stop()
    server.stop()
    eyes.close()
