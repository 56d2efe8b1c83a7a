"""In-process publish/subscribe of server events, feeding ``GET /api/events`` (server-sent events).

Publishers are plain threads (MQTT ingest, the job runner, the housekeeping loop);
subscribers are asyncio consumers in uvicorn's loop. ``publish`` hands each event to every
subscriber's loop with ``call_soon_threadsafe``; a subscriber that falls behind by more than
``maxsize`` events loses the oldest ones (a dashboard must never slow the server down).
With replicas, ``relay`` also hands each event to the other replicas (fleet_server.event_relay),
which ``deliver`` theirs to their own subscribers.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

EventKind = Literal["device", "telemetry", "drift", "status", "analysis", "deployment", "reanalysis", "drift_alert"]
CLOSING = "closing"  # not an event: what ``close`` hands every subscriber, so its stream ends
KINDS: tuple[str, ...] = ("device", "telemetry", "drift", "status", "analysis", "deployment", "reanalysis",
                          "drift_alert")


class Subscription:
    """One listener's queue, bound to the event loop that reads it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, dict]] = asyncio.Queue(maxsize)
        self.dropped = 0

    def _put(self, item: tuple[str, dict]) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(item)


class EventBus:
    """Fan-out of (kind, data) events to every subscriber; ``counts`` per kind for health checks."""

    def __init__(self, maxsize: int = 1000) -> None:
        self._subs: set[Subscription] = set()
        self._lock = threading.Lock()
        self.maxsize = maxsize
        self.counts: Counter[str] = Counter()
        self.relay: Callable[[str, dict[str, Any]], None] | None = None  # set by FleetServer with replicas
        self.closed = threading.Event()

    def subscribe(self) -> Subscription:
        """Register a subscriber for the running event loop (call from inside that loop)."""
        sub = Subscription(asyncio.get_running_loop(), self.maxsize)
        with self._lock:
            self._subs.add(sub)
        return sub

    def close(self) -> None:
        """The server is stopping: hand every subscriber ``(CLOSING, {})`` so its stream ends now (an event
        stream never ends by itself, and the HTTP server waits for open responses). Thread-safe, idempotent."""
        self.closed.set()
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(sub._put, (CLOSING, {}))
            except RuntimeError:  # its loop is closed already
                self.unsubscribe(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget a subscriber (idempotent)."""
        with self._lock:
            self._subs.discard(sub)

    def publish(self, kind: EventKind, data: dict[str, Any]) -> None:
        """Send one event to every subscriber; thread-safe, never blocks. Raises ValueError for an unknown kind."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}; use one of {KINDS}")
        self.deliver(kind, data)
        if self.relay is not None:
            self.relay(kind, data)

    def deliver(self, kind: str, data: dict[str, Any]) -> None:
        """Hand one event to this process's subscribers only (publish, and events relayed from a replica)."""
        self.counts[kind] += 1
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(sub._put, (kind, data))
            except RuntimeError:  # its loop is closed: the client went away
                self.unsubscribe(sub)


def sse_frame(kind: str, data: dict[str, Any]) -> str:
    """One server-sent event: ``event: kind`` + ``data: json`` + blank line."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"
