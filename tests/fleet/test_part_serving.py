"""Serving part frames at scale through a real mosquitto, and what happens when paho has no packet id left.

Part frames (and chunks) travel at QoS 0 (toco_core.topics.DELIVERY): ~70,000 of them, served by the
server's BundlePublisher through its FleetMqtt to 100 devices at once, all arrive with the bytes asked
for. At QoS 1 every one of them would hold one of paho's 65,535 packet ids until the broker's PUBACK;
with the broker gone, QoS 1 publishes past that many are refused, and FleetMqtt.send raises
PublishRefused instead of letting them vanish. A deployment whose commands are refused leaves its
members pending (not marked sent), and the tick sends them once the broker is back.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import select

from bench._fleet_broker import BROKER_LIMITS
from fleet_server.bundle_publisher import BundlePublisher
from fleet_server.db import Database, DeploymentDeviceRow, TimelineRow
from fleet_server.deployments import Deployments
from fleet_server.events import EventBus
from fleet_server.get_queue import GetQueue
from fleet_server.mqtt_client import FleetMqtt, PublishRefused
from fleet_server.recent_ranges import RecentRanges
from tests.support.broker import Broker, Listener
from tests.support.fleet_seed import seed_deployable
from tests.support.waiting import wait_until
from toco_core.bundle import BundleManifest, generate_private_key, make_manifest, pack_bundle
from toco_core.messages import MessageKind, PartRange, PartRequest, encode, parse_message
from toco_core.topics import Topics

FLEET = "parts"
T = Topics(FLEET)
DEVICES, RANGES, RANGE = 100, 700, 64  # 70,000 part frames of 64 bytes: more than paho's 65,535 packet ids
PACKET_IDS = 65_535


@pytest.fixture
def broker() -> Iterator[Broker]:
    """mosquitto with the shipped config's queue limits (deploy/mosquitto/toco.conf): at mosquitto's default of
    1,000 queued messages per client, this test's one subscriber of every device's frames would lose a third."""
    b = Broker(["allow_anonymous true", *BROKER_LIMITS])
    b.start()
    yield b
    b.cleanup()


@pytest.fixture
def server_mqtt(broker) -> Iterator[FleetMqtt]:
    """The fleet server's MQTT client, connected; it receives nothing here (the test calls the publisher)."""
    client = FleetMqtt(broker.url, T, on_device=lambda kind, dev, payload, ack, again: ack(), on_get=lambda t, p: None,
                       client_id="toco-fleet-parts")
    client.start()
    yield client
    client.stop()


class PartCounter:
    """A device-side subscriber on every device's part topic at QoS 0, as agents subscribe."""

    def __init__(self, port: int, bundle_id: str) -> None:
        self.frames: Counter[tuple[str, str, int]] = Counter()  # (device, part, offset) -> frames
        self.bad = 0
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="part-counter")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(T.part(bundle_id, "+"), 0)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.ready.wait(5), "the subscriber's SUBACK did not come"

    def _on_message(self, client, userdata, msg) -> None:
        device = T.parse(msg.topic).device_id
        part = parse_message(MessageKind.PART, bytes(msg.payload))
        with self.lock:
            self.frames[(str(device), part.part, part.offset)] += 1
            self.bad += part.data != expected(part.offset)

    def total(self) -> int:
        with self.lock:
            return sum(self.frames.values())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def expected(offset: int) -> bytes:
    """The bytes of the range at ``offset`` of the served part (each range different, so a mix-up shows)."""
    return (offset // RANGE).to_bytes(4, "big") * (RANGE // 4)


def test_70000_part_frames_at_qos0_all_arrive(broker, server_mqtt):
    data = pack_bundle({"codes/top": b"".join(expected(i * RANGE) for i in range(RANGES))})
    manifest = make_manifest(data, private_key=generate_private_key())
    publisher = BundlePublisher(T, server_mqtt.send)
    publisher.announce(manifest, data)
    counter = PartCounter(broker.port, manifest.bundle_id)
    try:
        ranges = [PartRange(part="codes/top", offset=i * RANGE, length=RANGE) for i in range(RANGES)]
        for d in range(DEVICES):
            device = f"dev{d:03d}"
            for i in range(0, RANGES, 64):
                req = PartRequest(device_id=device, bundle_id=manifest.bundle_id, ranges=ranges[i:i + 64])
                publisher.handle_get(T.get(manifest.bundle_id, device), encode(req))
        total = DEVICES * RANGES
        assert publisher.stats["ranges_sent"] == total
        assert server_mqtt.stats["refused"] == 0 and server_mqtt.stats["dropped_disconnected"] == 0
        wait_until(lambda: counter.total() >= total, 30, step=0.2)
        assert counter.total() == total, f"{counter.total()} of {total} part frames arrived"
        assert len(counter.frames) == total and set(counter.frames.values()) == {1}  # each range once, to its asker
        assert counter.bad == 0
    finally:
        counter.close()


class _Publisher:
    """The deployment's bundle announcement is not what this test is about (its manifest is QoS 1 too)."""

    def announce(self, manifest, data) -> None:
        self.announced = manifest.bundle_id


def test_qos1_past_65535_packet_ids_raises_publish_refused_and_the_deployment_sends_later(broker, server_mqtt,
                                                                                          tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        analysis_id = seed_deployable(db, tmp_path, 5)
        deployments = Deployments(db, EventBus(), publisher=_Publisher(), send_command=server_mqtt.send_command,
                                  timeout_s=600)
        broker.stop()
        assert wait_until(lambda: not server_mqtt.connected.is_set(), 10)
        # QoS 0 while disconnected is gone: counted, not raised
        assert server_mqtt.send(T.part("0" * 64, "dev000"), b"x", 0, False) is False
        assert server_mqtt.stats["dropped_disconnected"] == 1
        # QoS 1 is kept by paho for the reconnect, one packet id each, until none is left
        topic = T.device(MessageKind.CMD, "nobody")
        for _ in range(PACKET_IDS):
            assert server_mqtt.send(topic, b"queued", 1, False) is True
        assert server_mqtt.stats["queued_disconnected"] == PACKET_IDS
        with pytest.raises(PublishRefused, match="packet id"):
            server_mqtt.send(topic, b"one too many", 1, False)
        assert server_mqtt.stats["refused"] == 1

        # a deployment created now: its commands are refused, so no member is marked sent
        dep = deployments.create(analysis_id=analysis_id, target={"group": "deploy"}, canary_share=1.0,
                                 failure_threshold=0.5)
        assert dep["counts"]["pending"] == 5 and dep["counts"]["in_progress"] == 0
        with db.session() as s:
            assert s.scalars(select(TimelineRow).where(TimelineRow.phase == "sent")).all() == []

        # the broker is back: paho delivers its queue, packet ids come free, and the tick sends the wave
        broker.start()
        cmds = Listener(broker.port, [T.device(MessageKind.CMD, "+")])  # subscribed before any tick runs
        assert wait_until(server_mqtt.connected.is_set, 15)

        def all_sent() -> bool:
            deployments.tick()
            with db.session() as s:
                return all(m.phase == "sent" for m in s.scalars(select(DeploymentDeviceRow)))
        assert wait_until(all_sent, 20, step=0.5)
        members = {m["device_id"] for m in deployments.get(deployment_id=dep["deployment_id"])["devices"]}

        def commands() -> list[str]:
            with cmds.lock:
                return sorted(T.parse(t).device_id or "" for t, p, _ in cmds.messages if p != b"queued")
        assert wait_until(lambda: len(commands()) >= len(members), 10)
        assert commands() == sorted(members)  # each member's command once
        cmds.close()
    finally:
        db.close()


def _coalescing_publisher(broker, server_mqtt, window_s: float) -> tuple[BundlePublisher, BundleManifest, PartCounter]:
    """A publisher that announced a fresh parts bundle and coalesces within ``window_s``; a counter of its frames."""
    data = pack_bundle({"codes/top": b"".join(expected(i * RANGE) for i in range(RANGES))})
    manifest = make_manifest(data, private_key=generate_private_key())
    publisher = BundlePublisher(T, server_mqtt.send, recent=RecentRanges(window_s=window_s, horizon_s=60.0))
    publisher.announce(manifest, data)
    return publisher, manifest, PartCounter(broker.port, manifest.bundle_id)


def test_a_range_asked_for_again_before_its_answer_went_out_arrives_once(broker, server_mqtt):
    """Coalescing (fleet_server.recent_ranges): duplicates of a range the server just published, or asked for
    before it published it, are not published again; a request made after the answer went out (the answer was
    lost) is served once the short window has passed."""
    publisher, manifest, counter = _coalescing_publisher(broker, server_mqtt, window_s=0.5)
    topic = T.get(manifest.bundle_id, "dev000")
    ranges = [PartRange(part="codes/top", offset=i * RANGE, length=RANGE) for i in range(10)]
    try:
        # a server 30 s behind: the box's request and its re-request 10 s later were both made before the answer
        # to the first went out, and reach the server after it
        first = PartRequest(device_id="dev000", bundle_id=manifest.bundle_id, ranges=ranges, sent_at=time.time() - 30)
        again = first.model_copy(update={"sent_at": first.sent_at + 10})
        assert publisher.handle_get(topic, encode(first)) == 10
        assert publisher.handle_get(topic, encode(again)) == 0
        assert publisher.handle_get(topic, encode(first)) == 0  # the same request delivered twice
        # another device's identical ranges are its own
        other = PartRequest(device_id="dev001", bundle_id=manifest.bundle_id, ranges=ranges)
        assert publisher.handle_get(T.get(manifest.bundle_id, "dev001"), encode(other)) == 10
        assert publisher.stats["ranges_coalesced"] == 20 and publisher.stats["ranges_sent"] == 20
        assert wait_until(lambda: counter.total() >= 20, 10, step=0.1)
        time.sleep(0.6)  # past the window: the late duplicate is still not served, a request made now is
        assert publisher.handle_get(topic, encode(again)) == 0
        lost = PartRequest(device_id="dev000", bundle_id=manifest.bundle_id, ranges=ranges[:3])
        assert publisher.handle_get(topic, encode(lost)) == 3
        assert wait_until(lambda: counter.total() >= 23, 10, step=0.1)
        time.sleep(0.3)  # nothing more is on its way
        assert counter.total() == 23 and counter.bad == 0
        assert [counter.frames[("dev000", "codes/top", r.offset)] for r in ranges] == [2, 2, 2] + [1] * 7
        assert publisher.stats["ranges_coalesced"] == 30
    finally:
        counter.close()


def test_a_refetch_of_ranges_just_sent_is_served_again(broker, server_mqtt):
    """A box whose part failed its signed hash throws the part away and asks again at once, marked refetch
    (agent.parts_fetch): inside the coalescing window the server serves it anyway; unmarked, it would not."""
    publisher, manifest, counter = _coalescing_publisher(broker, server_mqtt, window_s=30.0)
    topic = T.get(manifest.bundle_id, "dev000")
    ranges = [PartRange(part="codes/top", offset=i * RANGE, length=RANGE) for i in range(4)]
    try:
        first = PartRequest(device_id="dev000", bundle_id=manifest.bundle_id, ranges=ranges)
        assert publisher.handle_get(topic, encode(first)) == 4
        asked = PartRequest(device_id="dev000", bundle_id=manifest.bundle_id, ranges=ranges)
        assert publisher.handle_get(topic, encode(asked)) == 0  # a duplicate within the window
        refetch = PartRequest(device_id="dev000", bundle_id=manifest.bundle_id, ranges=ranges, refetch=True)
        assert publisher.handle_get(topic, encode(refetch)) == 4
        assert wait_until(lambda: counter.total() >= 8, 10, step=0.1)
        assert [counter.frames[("dev000", "codes/top", r.offset)] for r in ranges] == [2] * 4 and counter.bad == 0
    finally:
        counter.close()


def test_status_messages_are_read_while_part_requests_are_still_being_answered(broker):
    """fleet_server.get_queue: part requests are answered on a thread of their own, so a status a box sends after
    a pile of part requests reaches ingest at once, not after every frame was served (the real FleetMqtt, the real
    publisher with a 10 ms pause per frame, a real broker)."""
    data = pack_bundle({"codes/top": b"".join(expected(i * RANGE) for i in range(RANGES))})
    manifest = make_manifest(data, private_key=generate_private_key())
    statuses: list[tuple[float, int]] = []  # (when, ranges served by then)
    holder: dict = {}

    def slow(bundle_id: str, part: str, offset: int, payload: bytes) -> bytes:
        time.sleep(0.01)  # a loaded server: 640 frames take 6.4 s
        return payload

    def on_device(kind, device, payload, ack, redelivered) -> None:
        statuses.append((time.monotonic(), holder["publisher"].stats["ranges_sent"]))
        ack()

    client = FleetMqtt(broker.url, T, on_device=on_device, on_get=lambda t, p: holder["queue"].submit(t, p),
                       client_id="toco-fleet-queue")
    publisher = holder["publisher"] = BundlePublisher(T, client.send, part_fault=slow)
    queue = holder["queue"] = GetQueue(publisher.handle_get, written=client.wait_written)
    client.start()
    publisher.announce(manifest, data)
    counter = PartCounter(broker.port, manifest.bundle_id)
    box = Listener(broker.port, [])
    try:
        ranges = [PartRange(part="codes/top", offset=i * RANGE, length=RANGE) for i in range(640)]
        for i in range(0, 640, 64):
            req = PartRequest(device_id="dev000", bundle_id=manifest.bundle_id, ranges=ranges[i:i + 64])
            box.publish(T.get(manifest.bundle_id, "dev000"), encode(req))
        sent_at = time.monotonic()
        box.publish(T.device(MessageKind.STATUS, "dev000"), b"{}")
        assert wait_until(lambda: statuses, 10, step=0.05)
        when, served = statuses[0]
        assert when - sent_at < 2.0 and served < 640, f"status read after {when - sent_at:.1f} s, {served} served"
        assert wait_until(lambda: counter.total() >= 640, 25, step=0.2)
        assert counter.total() == 640 and counter.bad == 0 and queue.stats["queued"] == 10 and len(queue) == 0
    finally:
        queue.close()
        box.close()
        counter.close()
        client.stop()
