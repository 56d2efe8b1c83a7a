"""Server side of the chunk protocol: retained manifests out, chunk and part requests answered.

A ChunkRequest (format-1 bundles) is answered on ``bundles/{b}/chunk/{i}``, seen by every
downloader of the bundle; a PartRequest (parts bundles) range by range on the asker's own
``bundles/{b}/part/{device}``, so a box receives only the bytes it asked for. A range asked for
again before its answer could have reached the box is not served twice (coalesced:
fleet_server.recent_ranges); ``stats`` counts them, the time spent serving and how old requests
were when served (the server's backlog).

``BundlePublisher`` knows nothing of paho: it gets a ``send(topic, payload, qos, retain)``
function, so the fleet server can plug it into its own MQTT client. With ``load`` it also serves a
stored bundle it never announced: replicas share requests (``$share``), so the replica a request
reaches is often not the one whose deployment announced the bundle, or that one is gone. ``MqttBundleServer`` is
the thin paho wiring for tests, benchmarks and a stand-alone publisher.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import paho.mqtt.client as mqtt

from fleet_server.recent_ranges import RecentRanges
from toco_core.bundle import BundleManifest, FileEntry, chunk_bytes, verify_bundle_bytes
from toco_core.errors import BundleError
from toco_core.messages import (
    MAX_CHUNKS_PER_REQUEST,
    ChunkRequest,
    MessageError,
    MessageKind,
    PartRequest,
    encode,
    encode_chunk,
    encode_part,
    parse_message,
)
from toco_core.mqtt_client_factory import make_mqtt_client
from toco_core.topics import DELIVERY, Topics, parse_broker_url

log = logging.getLogger("toco.fleet.bundles")
# (topic, payload, qos, retain) -> False when a QoS 0 publish was dropped (e.g. while disconnected); raises
# when a QoS 1 publish is refused (fleet_server.mqtt_client.PublishRefused)
SendFn = Callable[[str, bytes, int, bool], bool | None]
# (bundle_id) -> its stored manifest and bytes, or None when not stored
LoadFn = Callable[[str], tuple[BundleManifest, bytes] | None]
_MISS_TTL_S = 10.0  # a bundle found not stored is not looked up again for this long (requests repeat)
# a part request served later than this after the box sent it came after the box's own re-request timeout
LATE_REQUEST_S = 10.0
# Fault injection for tests and benchmarks: (bundle_id, index, payload) -> payload to send, or None to drop it.
ChunkFault = Callable[[str, int, bytes], bytes | None]
# The same for part ranges: (bundle_id, part, offset, payload) -> payload to send, or None to drop it.
PartFault = Callable[[str, str, int, bytes], bytes | None]


class BundlePublisher:
    """Announces bundles and serves their chunks and part ranges; ``requests`` counts (bundle_id, index)
    asked for, ``part_bytes`` the bytes of part ranges sent per (bundle_id, device, part)."""

    def __init__(self, topics: Topics, send: SendFn, fault: ChunkFault | None = None,
                 part_fault: PartFault | None = None, load: LoadFn | None = None,
                 recent: RecentRanges | None = None) -> None:
        """``recent``: the coalescing rule's memory (default: a 5 s window, a 60 s horizon)."""
        self.topics = topics
        self.send = send
        self.load = load
        self._missing: dict[str, float] = {}
        self.fault = fault
        self.part_fault = part_fault
        self.requests: Counter[tuple[str, int]] = Counter()
        self.part_bytes: Counter[tuple[str, str, str]] = Counter()
        # ranges_sent, ranges_coalesced, part_requests, part_requests_late (older than LATE_REQUEST_S when
        # served), serve_ms (time spent answering part requests), request_age_max_ms; plus drops and misses
        self.stats: Counter[str] = Counter()
        self._bundles: dict[str, tuple[BundleManifest, bytes]] = {}
        self._lock = threading.Lock()
        self._recent = recent if recent is not None else RecentRanges()
        self._files: dict[str, dict[str, FileEntry]] = {}  # bundle id -> its manifest's file entries by name

    def announce(self, manifest: BundleManifest, data: bytes) -> None:
        """Keep ``data`` for serving and publish its manifest retained. Raises BundleError on a mismatch."""
        verify_bundle_bytes(data, manifest)
        if not manifest.signature:
            raise BundleError(f"bundle {manifest.bundle_id[:12]} is unsigned",
                              "sign it with make_manifest(private_key=...)")
        with self._lock:
            self._bundles[manifest.bundle_id] = (manifest, data)
        self._send_manifest(manifest)

    def withdraw(self, bundle_id: str) -> None:
        """Stop serving a bundle and clear its retained manifest (an empty retained payload)."""
        with self._lock:
            self._bundles.pop(bundle_id, None)
            self._files.pop(bundle_id, None)
            self._missing[bundle_id] = time.monotonic() + _MISS_TTL_S
        self.send(self.topics.manifest(bundle_id), b"", 1, True)

    def republish(self) -> None:
        """Publish every manifest again, e.g. after a reconnect to a broker that lost its retained store."""
        with self._lock:
            manifests = [m for m, _ in self._bundles.values()]
        for m in manifests:
            self._send_manifest(m)

    def _send_manifest(self, manifest: BundleManifest) -> None:
        rule = DELIVERY[MessageKind.MANIFEST]
        self.send(self.topics.manifest(manifest.bundle_id), encode(manifest), rule.qos, rule.retain)

    def handle_get(self, topic: str, payload: bytes) -> int:
        """Answer one chunk or part request; returns the number of chunks or ranges sent.

        Bad requests (malformed, payload disagreeing with the topic, an unknown bundle, part or
        range) are logged and dropped, never raised.
        """
        try:
            where = self.topics.parse(topic)
            request: ChunkRequest | PartRequest = parse_message(MessageKind.GET, payload)
            if where.kind is not MessageKind.GET:
                raise MessageError(f"{topic} is not a chunk request topic", "publish requests on bundles/+/get/+")
        except MessageError as exc:
            self.stats["dropped"] += 1
            log.warning("dropped chunk request", extra={"fields": {"topic": topic, "error": str(exc)}})
            return 0
        if request.device_id != where.device_id or request.bundle_id != where.bundle_id:
            self.stats["dropped"] += 1
            log.warning("chunk request payload disagrees with its topic", extra={"fields": {"topic": topic}})
            return 0
        entry = self._entry(request.bundle_id)
        if entry is None:
            self.stats["unknown_bundle"] += 1
            log.info("chunk request for a bundle not served", extra={"fields": {"bundle": request.bundle_id[:12]}})
            return 0
        manifest, data = entry
        if isinstance(request, PartRequest):
            return self._send_parts(request, manifest, data)
        sent = 0
        for i in request.chunks[:MAX_CHUNKS_PER_REQUEST]:
            if i >= manifest.n_chunks:
                continue
            self.requests[(manifest.bundle_id, i)] += 1
            chunk = encode_chunk(manifest.bundle_id, i, chunk_bytes(data, manifest, i))
            payload_out = chunk if self.fault is None else self.fault(manifest.bundle_id, i, chunk)
            if payload_out is None:
                continue
            if self.send(self.topics.chunk(manifest.bundle_id, i), payload_out, DELIVERY[MessageKind.CHUNK].qos,
                         False) is not False:
                sent += 1
        self.stats["chunks_sent"] += sent
        return sent

    def _entry(self, bundle_id: str) -> tuple[BundleManifest, bytes] | None:
        """The bundle served from memory, else loaded from the store (then kept), else None."""
        with self._lock:
            entry = self._bundles.get(bundle_id)
            if entry is not None or self.load is None or time.monotonic() < self._missing.get(bundle_id, 0.0):
                return entry
        loaded = self.load(bundle_id)
        if loaded is None:
            with self._lock:
                self._missing[bundle_id] = time.monotonic() + _MISS_TTL_S
            return None
        try:
            verify_bundle_bytes(loaded[1], loaded[0])
        except BundleError as exc:
            log.error("stored bundle does not match its manifest", extra={"fields": {"bundle": bundle_id[:12],
                                                                                     "error": str(exc)}})
            return None
        with self._lock:
            self._bundles[bundle_id] = loaded
        self.stats["loaded"] += 1
        return loaded

    def _send_parts(self, request: PartRequest, manifest: BundleManifest, data: bytes) -> int:
        """Send each requested range that lies inside a part of the manifest to the asker alone, unless it went
        to the asker lately (coalesced) and the request is no refetch. Returns the ranges published."""
        t0, wall = time.perf_counter(), time.time()
        age = wall - request.sent_at
        self.stats["part_requests"] += 1
        self.stats["part_requests_late"] += age > LATE_REQUEST_S
        self.stats["request_age_max_ms"] = max(self.stats["request_age_max_ms"], int(age * 1000))
        files = self._files.get(manifest.bundle_id)
        if files is None:  # made once per bundle: every part request looks its ranges up in it
            files = self._files[manifest.bundle_id] = {f.name: f for f in manifest.files}
        topic = self.topics.part(manifest.bundle_id, request.device_id)
        sent = coalesced = 0
        for r in request.ranges:
            entry = files.get(r.part)
            if entry is None or r.offset + r.length > entry.size:
                self.stats["bad_range"] += 1
                why = "unknown part" if entry is None else f"range {r.offset}+{r.length} outside its {entry.size} bytes"
                log.warning("dropped a part range", extra={"fields": {"bundle": manifest.bundle_id[:12], "part": r.part,
                                                                      "device": request.device_id, "why": why}})
                continue
            key = (request.device_id, manifest.bundle_id, r.part, r.offset)
            with self._lock:  # a refetch asks for what it got moments ago: it is no duplicate
                if not request.refetch and self._recent.is_duplicate(key, request.sent_at, time.monotonic(), wall):
                    coalesced += 1
                    continue
            start = entry.offset + r.offset
            part = encode_part(manifest.bundle_id, r.part, r.offset, data[start:start + r.length])
            out = part if self.part_fault is None else self.part_fault(manifest.bundle_id, r.part, r.offset, part)
            if out is None:
                continue
            if self.send(topic, out, DELIVERY[MessageKind.PART].qos, False) is False:
                continue  # dropped (counted by the MQTT client); the device asks for it again
            with self._lock:
                self._recent.published(key, time.monotonic(), wall)
            self.part_bytes[(manifest.bundle_id, request.device_id, r.part)] += r.length
            sent += 1
        self.stats["ranges_sent"] += sent
        self.stats["ranges_coalesced"] += coalesced
        self.stats["serve_ms"] += int((time.perf_counter() - t0) * 1000)
        return sent


class MqttBundleServer:
    """A paho client that runs a BundlePublisher: subscribes to chunk requests, re-announces on reconnect."""

    def __init__(self, url: str, fleet: str, *, client_id: str = "toco-bundle-server", username: str | None = None,
                 password: str | None = None, ca_file: str | None = None, fault: ChunkFault | None = None,
                 part_fault: PartFault | None = None) -> None:
        broker = parse_broker_url(url)
        self.broker = broker
        self.topics = Topics(fleet)
        self.connected = threading.Event()
        self.client = make_mqtt_client(client_id, broker, username=username, password=password, ca_file=ca_file,
                                       reconnect_min=1, reconnect_max=10)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        self.publisher = BundlePublisher(self.topics, self._send, fault, part_fault)

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        return self.client.publish(topic, payload, qos=qos, retain=retain).rc == mqtt.MQTT_ERR_SUCCESS

    def start(self, timeout: float = 10.0) -> None:
        """Connect in the background and wait up to ``timeout`` s. Raises TimeoutError if not connected."""
        self.client.connect_async(self.broker.host, self.broker.port, 30)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise TimeoutError(f"bundle server could not reach {self.broker.host}:{self.broker.port}")

    def stop(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the bundle server", extra={"fields": {"reason": str(reason_code)}})
            return
        client.subscribe(self.topics.get(), DELIVERY[MessageKind.GET].qos)
        self.publisher.republish()
        self.connected.set()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            self.publisher.handle_get(msg.topic, bytes(msg.payload))
        except Exception:  # never let one request take the network thread down
            log.exception("serving a chunk request failed", extra={"fields": {"topic": msg.topic}})
