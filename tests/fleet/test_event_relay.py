"""Replicas relay their dashboard events to each other in batches: every event arrives, in order, in a handful
of MQTT messages instead of one each; a lone event goes out within the interval; what is pending when a
replica stops is sent; the one-event messages of older replicas are still delivered, junk is dropped.
(tests/fleet/test_replicas.py follows events between two real replicas over mosquitto.)"""

from __future__ import annotations

import json
import time

from fleet_server.event_relay import MAX_BATCH, EventRelay
from fleet_server.events import EventBus
from tests.support.waiting import wait_until
from toco_core.topics import Topics

T = Topics("plant")


class Pair:
    """Replicas a and b, each publishing to the other's relay and hearing its own echo, as on the broker."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.messages: list[dict] = []
        self.buses = {"a": EventBus(), "b": EventBus()}
        self.delivered: dict[str, list[tuple[str, dict]]] = {"a": [], "b": []}
        for name, bus in self.buses.items():
            bus.deliver = lambda kind, data, name=name: self.delivered[name].append((kind, data))  # type: ignore
        self.relays = {name: EventRelay(bus, T, name, self._send, interval_s) for name, bus in self.buses.items()}

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        assert (topic, qos, retain) == (T.server_events(), 0, False)
        self.messages.append(json.loads(payload))
        for relay in self.relays.values():  # every replica subscribes plainly: the sender hears its echo
            relay.receive(payload)
        return True


def test_a_burst_of_events_arrives_whole_and_in_order_in_a_few_messages():
    pair = Pair(interval_s=60)  # no tick during the test: the batches are the burst's own
    a = pair.relays["a"]
    a.start()
    events = [("telemetry", {"device_id": f"dev-{i:05d}", "cpu_percent": float(i)}) for i in range(1200)]
    for kind, data in events:
        a.forward(kind, data)
    assert len(pair.delivered["b"]) == 2 * MAX_BATCH, "a full batch goes out at once"
    a.stop()
    assert pair.delivered["b"] == events
    assert pair.delivered["a"] == [], "a replica drops its own echo"
    assert [len(m["events"]) for m in pair.messages] == [MAX_BATCH, MAX_BATCH, 200]


def test_a_lone_event_goes_out_within_the_interval_and_stop_sends_what_is_pending():
    pair = Pair(interval_s=0.05)
    a = pair.relays["a"]
    a.start()
    t0 = time.monotonic()
    a.forward("status", {"device_id": "dev-00001", "phase": "active"})
    assert wait_until(lambda: pair.delivered["b"], 2, 0.01)
    assert time.monotonic() - t0 < 1.0
    a.stop()
    slow = Pair(interval_s=60)  # its thread would wait a minute: stop() must not leave the event behind
    slow.relays["a"].start()
    slow.relays["a"].forward("deployment", {"id": "d-1"})
    slow.relays["a"].stop()
    assert slow.delivered["b"] == [("deployment", {"id": "d-1"})]


def test_the_one_event_form_of_older_replicas_is_delivered_and_junk_is_dropped(caplog):
    pair = Pair()
    b = pair.relays["b"]
    b.receive(json.dumps({"replica": "old", "kind": "drift", "data": {"device_id": "dev-00002"}}).encode())
    odd = [["nonsense", {}], ["drift"], ["drift", "not a dict"]]
    for junk in (b"not json", b'{"replica": "x"}', b'{"replica": "x", "events": 3}',
                 json.dumps({"replica": "x", "events": odd}).encode()):
        b.receive(junk)
    assert pair.delivered["b"] == [("drift", {"device_id": "dev-00002"})]
    assert b.received == 1
    assert sum("not readable" in r.getMessage() for r in caplog.records) == 3
