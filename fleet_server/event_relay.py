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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fleet_server.events import KINDS, EventBus
from fleet_server.overview_cache import outdate_counts
from toco_core.topics import Topics

log = logging.getLogger("toco.fleet.relay")
SendFn = Callable[[str, bytes, int, bool], object]  # fleet_server.mqtt_client.FleetMqtt.send; its answer unused
# events that never follow a change of a device's state, alert, drift kind, group or bundle
UNCOUNTED_KINDS = frozenset({"telemetry", "analysis", "reanalysis"})


class EventRelay:
    """Forwards this replica's events to the others and delivers theirs to this replica's subscribers."""

    def __init__(self, bus: EventBus, topics: Topics, replica_id: str, send: SendFn) -> None:
        """``send(topic, payload, qos, retain)``: the MQTT client's raw publish."""
        self.bus, self.topic, self.replica_id, self.send = bus, topics.server_events(), replica_id, send
        self.received = 0

    def forward(self, kind: str, data: dict) -> None:
        """Publish one local event for the other replicas (the EventBus's relay hook). Never raises."""
        try:
            payload = json.dumps({"replica": self.replica_id, "kind": kind, "data": data}, separators=(",", ":"),
                                 default=str).encode()
            self.send(self.topic, payload, 0, False)
        except Exception:  # a dashboard update must never break the work that caused it
            log.exception("an event could not be relayed", extra={"fields": {"kind": kind}})

    def receive(self, payload: bytes) -> None:
        """Deliver another replica's event to this replica's subscribers; our own echo and junk are dropped."""
        try:
            msg = json.loads(payload)
            origin, kind, data = msg["replica"], msg["kind"], msg["data"]
        except (ValueError, KeyError, TypeError):
            log.warning("a relayed event is not readable; dropped")
            return
        if origin == self.replica_id or kind not in KINDS or not isinstance(data, dict):
            return
        self.received += 1
        if kind not in UNCOUNTED_KINDS:  # another replica may have changed what the overview counts
            outdate_counts()
        self.bus.deliver(kind, data)
