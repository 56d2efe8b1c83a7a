"""Bundle transfer through a real mosquitto: publisher -> chunks -> downloader, with faults."""

from __future__ import annotations

import json
import queue
import threading
import time

import numpy as np
import pytest

from agent.bundle_download import BundleDownloader
from agent.mqtt_link import MqttLink
from fleet_server.bundle_publisher import MqttBundleServer
from toco_core.bundle import generate_private_key, make_manifest, pack_bundle, unpack_bundle
from toco_core.messages import FailureReason, Phase, StatusMessage, encode, parse_message

from .conftest import Listener, wait_until

FLEET, DEV, KiB = "plant1", "cam-07", 1024


@pytest.fixture(scope="module")
def key():
    return generate_private_key()


def make_bundle(key, seed: int = 0, size: int = 3_000_000):
    rng = np.random.default_rng(seed)
    files = {"model.onnx": rng.bytes(size), "analysis/calibration.json": json.dumps({"seed": seed}).encode()}
    data = pack_bundle(files)
    return files, data, make_manifest(data, 64 * KiB, key, metadata={"model": "demo", "seed": seed})


@pytest.fixture(scope="module")
def bundle(key):
    return make_bundle(key)


class Gate:
    """Fault hook for the publisher: while closed, chunks >= ``first_dropped`` vanish (a link that died)."""

    def __init__(self, first_dropped: int) -> None:
        self.first_dropped = first_dropped
        self.open = threading.Event()

    def __call__(self, bundle_id: str, index: int, payload: bytes) -> bytes | None:
        return payload if self.open.is_set() or index < self.first_dropped else None


class Agent:
    """The link and downloader wired the way the agent wires them."""

    def __init__(self, url: str, state_dir, public_key, **kw) -> None:
        self.done: queue.Queue = queue.Queue()
        self.failed: queue.Queue = queue.Queue()
        self.link = MqttLink(url=url, fleet=FLEET, device_id=DEV, state_dir=state_dir, reconnect_min=0.2,
                             reconnect_max=1.0, agent_version="test")
        self.dl = BundleDownloader(self.link, state_dir, public_key, lambda m, d: self.done.put((m, d)),
                                   lambda b, r, d: self.failed.put((r, d)),
                                   request_timeout=kw.pop("request_timeout", 2.0), **kw)
        self.link.start()
        assert self.link.wait_connected(5)

    def close(self) -> None:
        self.dl.close()
        self.link.stop()


@pytest.fixture
def server(broker):
    servers = []

    def make(fault=None) -> MqttBundleServer:
        s = MqttBundleServer(broker.url, FLEET, fault=fault)
        s.start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def statuses(listener: Listener) -> list[StatusMessage]:
    return [parse_message("status", p) for p in listener.on(f"/devices/{DEV}/status")]


def requested(srv: MqttBundleServer, bundle_id: str, n: int) -> list[int]:
    return [srv.publisher.requests[(bundle_id, i)] for i in range(n)]


def test_3mb_bundle_reaches_the_downloader(broker, server, bundle, key, tmp_path) -> None:
    files, data, manifest = bundle
    srv = server()
    srv.publisher.announce(manifest, data)
    eyes = Listener(broker.port, [f"toco/v1/{FLEET}/devices/+/status"])
    agent = Agent(broker.url, tmp_path, key.public_key())
    t0 = time.perf_counter()
    agent.dl.download(manifest.bundle_id, "dep-1")
    got_manifest, got = agent.done.get(timeout=20)
    seconds = time.perf_counter() - t0
    print(f"\n3 MB bundle over loopback mosquitto: {seconds:.2f} s, {len(data) / seconds / 1e6:.1f} MB/s")
    assert got == data and unpack_bundle(got) == files and got_manifest == manifest
    assert requested(srv, manifest.bundle_id, manifest.n_chunks) == [1] * manifest.n_chunks
    assert wait_until(lambda: not (tmp_path / "downloads" / manifest.bundle_id).exists(), 5)
    assert wait_until(lambda: Phase.VERIFIED in [s.phase for s in statuses(eyes)], 5)
    phases = [s.phase for s in statuses(eyes)]
    assert phases[0] is Phase.RECEIVED and Phase.DOWNLOADING in phases
    assert all(s.deployment_id == "dep-1" for s in statuses(eyes))
    agent.close()
    eyes.close()


def _interrupted_download(broker, server, bundle, key, tmp_path):
    """Start a download whose chunks from 20 on are lost; return once 20 chunks are stored."""
    _, data, manifest = bundle
    gate = Gate(first_dropped=20)
    srv = server(fault=gate)
    srv.publisher.announce(manifest, data)
    agent = Agent(broker.url, tmp_path, key.public_key(), window=4)
    agent.dl.download(manifest.bundle_id, "dep-2")
    assert wait_until(lambda: agent.dl.progress(manifest.bundle_id) == (20, manifest.n_chunks), 10)
    return gate, srv, agent


def test_agent_restart_resumes_without_refetching(broker, server, bundle, key, tmp_path) -> None:
    _, data, manifest = bundle
    gate, srv, agent = _interrupted_download(broker, server, bundle, key, tmp_path)
    agent.close()  # the process goes away mid-transfer
    state = json.loads((tmp_path / "downloads" / manifest.bundle_id / "bitmap.json").read_text())
    assert state["n"] == manifest.n_chunks
    before = requested(srv, manifest.bundle_id, manifest.n_chunks)
    assert before[:20] == [1] * 20
    gate.open.set()
    again = Agent(broker.url, tmp_path, key.public_key(), window=4)
    assert again.dl.resume_pending() == [manifest.bundle_id]
    _, got = again.done.get(timeout=20)
    assert got == data
    after = requested(srv, manifest.bundle_id, manifest.n_chunks)
    assert after[:20] == [1] * 20, "chunks stored before the restart were requested again"
    assert all(c >= 1 for c in after[20:])
    assert again.dl.stats["chunks_resumed"] == 20
    again.close()


def test_broker_restart_resumes_without_refetching(broker, server, bundle, key, tmp_path) -> None:
    _, data, manifest = bundle
    gate, srv, agent = _interrupted_download(broker, server, bundle, key, tmp_path)
    birth = agent.link.birth
    broker.stop()
    assert wait_until(lambda: not agent.link.connected, 5)
    gate.open.set()
    broker.start()
    _, got = agent.done.get(timeout=20)
    assert got == data
    assert requested(srv, manifest.bundle_id, manifest.n_chunks)[:20] == [1] * 20
    assert agent.link.birth == birth + 1  # a new connection is a new birth
    agent.close()


def test_corrupt_chunk_is_requested_again(broker, server, bundle, key, tmp_path) -> None:
    _, data, manifest = bundle
    spoiled: set[int] = set()

    def corrupt_once(bundle_id: str, index: int, payload: bytes) -> bytes:
        if index == 5 and index not in spoiled:
            spoiled.add(index)
            return payload[:-1] + bytes([payload[-1] ^ 0xFF])
        return payload

    srv = server(fault=corrupt_once)
    srv.publisher.announce(manifest, data)
    agent = Agent(broker.url, tmp_path, key.public_key())
    agent.dl.download(manifest.bundle_id)
    _, got = agent.done.get(timeout=20)
    assert got == data
    assert agent.dl.stats["chunk_corrupt"] == 1
    assert srv.publisher.requests[(manifest.bundle_id, 5)] == 2
    agent.close()


def test_always_corrupt_chunk_fails_with_reason(broker, server, key, tmp_path) -> None:
    _, data, manifest = make_bundle(key, seed=1, size=400_000)

    def corrupt(bundle_id: str, index: int, payload: bytes) -> bytes:
        return payload[:-1] + bytes([payload[-1] ^ 0xFF]) if index == 3 else payload

    srv = server(fault=corrupt)
    srv.publisher.announce(manifest, data)
    eyes = Listener(broker.port, [f"toco/v1/{FLEET}/devices/+/status"])
    agent = Agent(broker.url, tmp_path, key.public_key(), max_retries=2)
    agent.dl.download(manifest.bundle_id, "dep-3")
    reason, detail = agent.failed.get(timeout=20)
    assert reason is FailureReason.CORRUPT_CHUNK and "chunk 3" in detail
    assert srv.publisher.requests[(manifest.bundle_id, 3)] == 3
    assert agent.done.empty() and wait_until(lambda: not (tmp_path / "downloads" / manifest.bundle_id).exists(), 5)
    assert wait_until(lambda: any(s.reason is FailureReason.CORRUPT_CHUNK for s in statuses(eyes)), 5)
    agent.close()
    eyes.close()


def test_bad_signature_and_unsigned_refused(broker, server, key, tmp_path) -> None:
    _, data, forged = make_bundle(generate_private_key(), seed=2, size=200_000)  # signed by a stranger
    srv = server()
    srv.publisher.announce(forged, data)
    agent = Agent(broker.url, tmp_path, key.public_key())
    agent.dl.download(forged.bundle_id)
    reason, detail = agent.failed.get(timeout=10)
    assert reason is FailureReason.BAD_SIGNATURE and "bad signature" in detail

    _, data2, signed = make_bundle(key, seed=3, size=200_000)
    unsigned = signed.model_copy(update={"signature": None})
    eyes = Listener(broker.port, [])
    eyes.publish(srv.topics.manifest(unsigned.bundle_id), encode(unsigned), retain=True)
    agent.dl.download(unsigned.bundle_id)
    reason, _ = agent.failed.get(timeout=10)
    assert reason is FailureReason.UNSIGNED
    assert not any(b in (forged.bundle_id, unsigned.bundle_id) for b, _ in srv.publisher.requests)
    agent.close()
    eyes.close()


def test_bundle_too_big_for_the_disk_budget_is_refused(broker, server, bundle, key, tmp_path) -> None:
    _, data, manifest = bundle
    srv = server()
    srv.publisher.announce(manifest, data)
    eyes = Listener(broker.port, [f"toco/v1/{FLEET}/devices/+/status"])
    agent = Agent(broker.url, tmp_path, key.public_key(), disk_budget=4_000_000)
    agent.dl.download(manifest.bundle_id, "dep-4")
    reason, detail = agent.failed.get(timeout=10)
    assert reason is FailureReason.NO_DISK and "disk" in detail
    assert srv.publisher.requests.total() == 0
    assert wait_until(lambda: any(s.phase is Phase.REFUSED for s in statuses(eyes)), 5)
    refused = [s for s in statuses(eyes) if s.phase is Phase.REFUSED][0]
    assert refused.reason is FailureReason.NO_DISK and refused.deployment_id == "dep-4"
    agent.close()
    eyes.close()
