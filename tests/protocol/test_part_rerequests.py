"""When the agent's parts fetch asks again: not while a slow server's frames still flow, and backing off when it
goes silent (the real PartsFetcher and MqttLink, the real BundlePublisher, one real mosquitto).

The timings are the agent's own rule scaled down (toco_core.rerequest): the first re-request after
``request_timeout`` s without a frame, each further one twice as long, up to ``backoff_cap``, each
stretched by up to a quarter of itself (jitter).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import pytest

from agent.mqtt_link import MqttLink
from agent.parts_fetch import FetchClosed, FetchFailed, PartsFetcher
from agent.parts_store import PartsStore
from fleet_server.bundle_publisher import MqttBundleServer
from toco_core.bundle import generate_private_key, make_manifest, pack_bundle
from toco_core.messages import FailureReason, MessageKind, PartRequest, parse_message

from .conftest import wait_until

FLEET, DEV, RANGE = "plant1", "cam-09", 4096
PARTS = {"head": bytes(range(256)) * 16 * 10, "codes/top": b"t" * (RANGE * 30)}  # 10 + 30 ranges of 4 KiB


class Server:
    """A real bundle server whose part frames can be slowed down or withheld, and that records every part request
    it receives (arrival time, ranges). Requests are answered in a thread of their own, as a busy server's frames
    go out one by one (paho writes what its network thread's callback publishes only once the callback returns)."""

    def __init__(self, url: str, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.silent = threading.Event()  # while set, no frame goes out (a server that stopped answering)
        self.requests: list[tuple[float, list[tuple[str, int]]]] = []
        self.lock = threading.Lock()
        self.srv = MqttBundleServer(url, FLEET, part_fault=self._frame)
        answer = self.srv.publisher.handle_get

        self.queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self.worker = threading.Thread(target=self._answer, args=(answer,), daemon=True)
        self.worker.start()

        def recording(topic: str, payload: bytes) -> int:
            req = parse_message(MessageKind.GET, payload)
            assert isinstance(req, PartRequest)
            with self.lock:
                self.requests.append((time.monotonic(), [(r.part, r.offset) for r in req.ranges]))
            self.queue.put((topic, payload))
            return 0
        self.srv.publisher.handle_get = recording  # type: ignore[method-assign]
        data = pack_bundle(PARTS)
        self.manifest = make_manifest(data, private_key=generate_private_key())
        self.srv.start()
        self.srv.publisher.announce(self.manifest, data)

    def _answer(self, answer) -> None:
        while (item := self.queue.get()) is not None:
            answer(*item)

    def stop(self) -> None:
        self.queue.put(None)
        self.worker.join(10)
        self.srv.stop()

    def _frame(self, bundle_id: str, part: str, offset: int, payload: bytes) -> bytes | None:
        if self.silent.is_set():
            return None
        time.sleep(self.delay_s)  # in the server's network thread: the frames trickle out one by one
        return payload

    def asked(self) -> list[tuple[float, list[tuple[str, int]]]]:
        with self.lock:
            return list(self.requests)


@pytest.fixture
def link(broker, tmp_path) -> Iterator[MqttLink]:
    link = MqttLink(url=broker.url, fleet=FLEET, device_id=DEV, state_dir=tmp_path, reconnect_min=0.2,
                    reconnect_max=1.0, agent_version="test")
    link.start()
    assert link.wait_connected(5)
    yield link
    link.stop()


def test_a_slow_server_streaming_frames_is_not_asked_again(broker, link, tmp_path) -> None:
    server = Server(broker.url, delay_s=0.12)  # 40 ranges at 0.12 s: ~5 s, four times the request timeout
    try:
        fetcher = PartsFetcher(link, PartsStore(tmp_path), range_size=RANGE, request_timeout=1.0, backoff_cap=4.0)
        t0 = time.monotonic()
        got = fetcher.fetch(server.manifest, ["head", "codes/top"])
        took = time.monotonic() - t0
        assert got == sum(len(v) for v in PARTS.values())
        assert took > 3 * fetcher.request_timeout  # the frames did take longer than a request timeout to come
        assert fetcher.stats["ranges_rerequested"] == 0 and fetcher.stats["timeouts"] == 0
        asked = [r for _, ranges in server.asked() for r in ranges]
        assert len(asked) == len(set(asked)) == 40  # each range asked for once
        assert (tmp_path / "parts" / server.manifest.bundle_id / "codes" / "top").read_bytes() == PARTS["codes/top"]
    finally:
        server.stop()


def test_a_silent_server_is_asked_again_with_growing_gaps_and_the_fetch_then_completes(broker, link,
                                                                                       tmp_path) -> None:
    server = Server(broker.url)
    server.silent.set()
    try:
        fetcher = PartsFetcher(link, PartsStore(tmp_path), range_size=RANGE, request_timeout=1.0, backoff_cap=4.0,
                               max_stalls=10)
        out: dict = {}
        worker = threading.Thread(target=lambda: out.update(got=fetcher.fetch(server.manifest, ["codes/top"])))
        worker.start()
        # the first request, then re-requests after 1, 2, 4, 4 s of silence (each up to a quarter later)
        assert wait_until(lambda: len(server.asked()) >= 5, 20, step=0.05)
        times = [t for t, _ in server.asked()]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        for gap, base in zip(gaps, (1.0, 2.0, 4.0, 4.0), strict=False):
            assert base - 0.05 <= gap <= base * 1.25 + 0.6, f"re-request gaps {gaps}"
        window = server.asked()[0][1]
        assert all(ranges == window for _, ranges in server.asked())  # the same ranges each time
        server.silent.clear()
        worker.join(15)
        assert out.get("got") == len(PARTS["codes/top"])
        assert fetcher.stats["ranges_rerequested"] == len(window) * fetcher.stats["timeouts"]
    finally:
        server.silent.clear()
        server.stop()


def test_a_server_that_never_answers_fails_the_fetch_as_stalled_with_the_silence_in_the_message(broker, link,
                                                                                                tmp_path) -> None:
    server = Server(broker.url)
    server.silent.set()
    try:
        fetcher = PartsFetcher(link, PartsStore(tmp_path), range_size=RANGE, request_timeout=0.5, backoff_cap=1.0,
                               max_stalls=3)
        t0 = time.monotonic()
        with pytest.raises(FetchFailed, match=r"no part frame arrived for \d+ s although the missing ranges were "
                                              r"asked for again 3 times") as err:
            fetcher.fetch(server.manifest, ["head"])
        assert err.value.reason is FailureReason.TRANSFER_STALLED
        # 0.5 + 1 + 1 + 1 s of silence (each up to a quarter longer), then the give-up
        assert 3.4 <= time.monotonic() - t0 <= 6.0
        assert len(server.asked()) == 4
    finally:
        server.stop()


def test_the_connect_hook_of_the_connection_a_fetch_started_on_does_not_ask_again(broker, link, tmp_path) -> None:
    # The link's on-connect hooks run on its dispatcher thread a moment after it reports itself connected: a fetch
    # that starts in between used to see the hook of its own connection as a reconnect and ask for its window twice.
    server = Server(broker.url)
    server.silent.set()
    try:
        fetcher = PartsFetcher(link, PartsStore(tmp_path), range_size=RANGE, request_timeout=30.0, max_stalls=1)
        out: dict = {}

        def fetch() -> None:
            try:
                fetcher.fetch(server.manifest, ["head"])
            except Exception as exc:  # noqa: BLE001 - the test checks which
                out["error"] = exc
        worker = threading.Thread(target=fetch)
        worker.start()
        assert wait_until(lambda: len(server.asked()) >= 1, 5, step=0.02)
        link._dispatcher.connected()  # the hook of the current connection, run late (as the race runs it)
        time.sleep(1.0)
        assert len(server.asked()) == 1, f"asked {len(server.asked())} times on one connection"
        fetcher.close()
        worker.join(10)
        assert isinstance(out.get("error"), FetchClosed)
    finally:
        server.stop()
