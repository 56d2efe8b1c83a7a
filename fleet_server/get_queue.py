"""Chunk and part requests answered on a thread of their own, not on paho's network thread.

The server's MQTT client reads every message of its connection on one thread: device statuses,
drift windows and births as well as chunk and part requests. Answering a part request there
(up to 64 frames, each built and handed to paho) kept that thread from reading anything else,
and paho writes what a callback publishes only after the callback returns, so the frames went
out in bursts. With 2,000 boxes fetching from one replica, requests waited 34 s to be served
and the boxes' status messages waited behind them, so the deployment's own silence timeout
failed boxes that had all their parts (docs/topology.md, "The re-request storm").

``GetQueue.submit`` only queues (the network thread goes back to reading); one worker thread
answers in arrival order through ``handle(topic, payload)``. A duplicate request that waits in
the queue behind its original is recognised by the publisher once the original was answered
(fleet_server.recent_ranges). At most ``limit`` requests wait; beyond that a request is dropped
and counted (the box asks again after its silence timeout).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable

log = logging.getLogger("toco.fleet.bundles")


class GetQueue:
    """A FIFO of (topic, payload) requests and the daemon thread that answers them with ``handle``."""

    def __init__(self, handle: Callable[[str, bytes], object], limit: int = 50_000,
                 written: Callable[[], object] | None = None) -> None:
        """``handle(topic, payload)`` answers one request (BundlePublisher.handle_get); ``limit`` requests may wait;
        ``written()`` blocks until what ``handle`` published is on the socket (FleetMqtt.wait_written), so the
        frames of at most one request wait in the MQTT client's memory instead of the whole backlog."""
        self.handle, self.limit, self.written = handle, limit, written
        self.stats: Counter[str] = Counter()  # queued, dropped (queue full), failed (handle raised)
        self._items: deque[tuple[str, bytes]] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="get-queue", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self._ready:
            return len(self._items)

    def submit(self, topic: str, payload: bytes) -> None:
        """Queue one request (called on paho's network thread: returns at once). A full queue drops it (counted)."""
        with self._ready:
            if len(self._items) >= self.limit:
                self.stats["dropped"] += 1
                return
            self._items.append((topic, payload))
            self.stats["queued"] += 1
            self._ready.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the request being answered; the requests still queued are dropped (boxes ask again)."""
        with self._ready:
            self._closed = True
            self._items.clear()
            self._ready.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._items and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                topic, payload = self._items.popleft()
            try:
                self.handle(topic, payload)
                if self.written is not None:
                    self.written()
            except Exception:  # one bad request must not end the serving thread
                self.stats["failed"] += 1
                log.exception("answering a chunk or part request failed", extra={"fields": {"topic": topic}})
