"""Dashboard live updates from any replica: each replica's events reach every other one over the broker.

Why the broker and not the database: with shared subscriptions a replica sees only its share of the
device messages, and only the leader runs jobs, deployment ticks and the drift policy, so the events a
browser needs happen on whichever replica did the work. Each replica therefore publishes its own events
(QoS 0, not retained) on ``toco/v1/{fleet}/server/events`` and subscribes to it plainly (not shared):
every replica's browsers see every event. The broker already carries all this traffic and its payload
limit fits any event (PostgreSQL's NOTIFY stops at 8,000 bytes, which a large deployment's view
exceeds, and serialises committing transactions behind a global lock). The server's ACL user
already reads and writes the fleet tree; no device may read this topic.

MQTT 3.1.1 has no "no local" option, so a replica also hears its own events and drops them by the
replica id they carry. An event is best effort, as it is inside one process: a browser that missed
one reloads state from the API anyway.

Events travel in batches, ``{"replica", "events": [[kind, data], ...]}``, one message per ``interval_s``
(0.1 s) or per ``MAX_BATCH`` events, whichever comes first. One message per event made the relay as much
MQTT traffic as the devices' own: at 10,000 devices each telemetry point was one relay publish and one
delivery to every replica (its own echo included), 3,000 messages a second for two replicas beside the
1,000 they ingest. A dashboard sees an event up to ``interval_s`` later. A single event,
``{"replica", "kind", "data"}`` (what replicas of session 20 and before send), is still delivered.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from fleet_server.events import KINDS, EventBus
from fleet_server.overview_cache import outdate_counts
from toco_core.topics import Topics

log = logging.getLogger("toco.fleet.relay")
SendFn = Callable[[str, bytes, int, bool], object]  # fleet_server.mqtt_client.FleetMqtt.send; its answer unused
# events that never follow a change of a device's state, alert, drift kind, group or bundle
UNCOUNTED_KINDS = frozenset({"telemetry", "analysis", "reanalysis"})
MAX_BATCH = 500  # events in one relay message (~100-200 KB of JSON; mosquitto's packet limit is 5 MB as shipped)


class EventRelay:
    """Forwards this replica's events to the others in batches and delivers theirs to this replica's
    subscribers. ``start`` runs the flushing thread; ``stop`` sends what is left and ends it."""

    def __init__(self, bus: EventBus, topics: Topics, replica_id: str, send: SendFn,
                 interval_s: float = 0.1) -> None:
        """``send(topic, payload, qos, retain)``: the MQTT client's raw publish; ``interval_s``: the longest an
        event waits for its batch."""
        self.bus, self.topic, self.replica_id, self.send = bus, topics.server_events(), replica_id, send
        self.interval_s = interval_s
        self.received = 0
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread that sends the batch every ``interval_s``."""
        self._thread = threading.Thread(target=self._loop, name="event-relay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send what is pending and end the thread (within ~``interval_s``). Raises nothing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1 + self.interval_s)
        self.flush()

    def forward(self, kind: str, data: dict) -> None:
        """Queue one local event for the other replicas (the EventBus's relay hook); a full batch goes out
        now, in the caller's thread. Never raises."""
        with self._lock:
            self._pending.append((kind, data))
            full = len(self._pending) >= MAX_BATCH
        if full:
            self.flush()

    def flush(self) -> None:
        """Publish the pending events as one message (none when nothing is pending). Never raises."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            payload = json.dumps({"replica": self.replica_id, "events": batch}, separators=(",", ":"),
                                 default=str).encode()
            self.send(self.topic, payload, 0, False)
        except Exception:  # a dashboard update must never break the work that caused it
            log.exception("events could not be relayed", extra={"fields": {"events": len(batch)}})

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def receive(self, payload: bytes) -> None:
        """Deliver another replica's events to this replica's subscribers; our own echo and junk are dropped."""
        try:
            msg = json.loads(payload)
            origin = msg["replica"]
            events = msg["events"] if "events" in msg else [[msg["kind"], msg["data"]]]
            if not isinstance(events, list):
                raise TypeError("events is not a list")
        except (ValueError, KeyError, TypeError):
            log.warning("a relayed event is not readable; dropped")
            return
        if origin == self.replica_id:
            return
        for event in events:
            if not (isinstance(event, list) and len(event) == 2):
                continue
            kind, data = event
            if kind not in KINDS or not isinstance(data, dict):
                continue
            self.received += 1
            if kind not in UNCOUNTED_KINDS:  # another replica may have changed what the overview counts
                outdate_counts()
            self.bus.deliver(kind, data)
