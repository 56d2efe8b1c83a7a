"""What the agent's MqttLink does with outgoing messages once it decided to publish them now.

Every message is stamped with the per-connection sequence number; a durable one keeps its
outbox row (agent.outbox) until the broker acknowledged the publish, and each row is handed to
paho at most once per process, however often the link reconnects. Only the rows paho holds
(handed, not yet acknowledged) are remembered for that: a set of every row ever handed grew a
long-running agent by one entry per status, drift and samples message.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import paho.mqtt.client as mqtt

from agent.outbox import Outbox
from toco_core.messages import AgentMessage, MessageError, encode, parse_message

log = logging.getLogger("toco.agent.mqtt")


class Publisher:
    """Publishes stamped agent messages through a paho client and settles outbox rows on PUBACK."""

    def __init__(self, client: mqtt.Client, outbox: Outbox, stats: Counter[str]) -> None:
        """Counts into the link's ``stats``."""
        self._client = client
        self._outbox = outbox
        self.stats = stats
        self._lock = threading.Lock()
        self._seq = 0
        self._mids: dict[int, int | None] = {}  # mid -> outbox row (None: not durable)
        self._early: set[int] = set()  # acks that overtook the registration of their mid
        self._handed: set[int] = set()  # outbox rows given to paho and not yet acknowledged

    def restart_seq(self) -> None:
        """Number the messages of a new connection from 0 again."""
        with self._lock:
            self._seq = 0

    def transmit(self, topic: str, message: AgentMessage, qos: int, retain: bool, row: int | None) -> None:
        """Stamp ``message`` with the next sequence number and publish it; ``row`` goes once it is acknowledged.

        A failed publish is logged, not raised: a durable message is sent again from its row.
        """
        with self._lock:
            stamped = message.model_copy(update={"seq": self._seq})
            self._seq += 1
        info = self._client.publish(topic, encode(stamped), qos=qos, retain=retain)
        self.stats["published"] += 1
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("publish failed", extra={"fields": {"topic": topic, "rc": mqtt.error_string(info.rc)}})
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                acked = True
            else:
                self._mids[info.mid] = row
                acked = False
        if acked and row is not None:
            self._settle(row)

    def hand_row(self, row: int, topic: str, kind: str, payload: bytes, qos: int, retain: bool) -> None:
        """Publish outbox ``row`` unless this process handed it to paho already (paho resends it itself).

        A row that no longer parses is removed with a warning.
        """
        with self._lock:
            # Neither held by paho nor in the outbox any more: handed and acknowledged already
            # (a reconnect's replay and the sending thread can both reach a new row).
            if row in self._handed or not self._outbox.holds(row):
                return
            self._handed.add(row)
        try:
            message = parse_message(kind, payload)
        except MessageError as exc:  # written by an older version: cannot be sent any more
            log.warning("dropping unreadable outbox row", extra={"fields": {"row": row, "error": str(exc)}})
            self._settle(row)
            return
        self.transmit(topic, message, qos, retain, row)  # type: ignore[arg-type]

    def acked(self, mid: int) -> None:
        """The broker acknowledged publish ``mid`` (paho's network thread): its outbox row, if any, goes."""
        with self._lock:
            if mid in self._mids:
                row = self._mids.pop(mid)
            else:
                self._early.add(mid)
                return
        if row is not None:
            self._settle(row)
            self.stats["acked"] += 1

    def _settle(self, row: int) -> None:
        """Forget an acknowledged (or unsendable) row: out of the outbox first, then out of ``_handed``,
        so that ``hand_row`` finds it in one of them at any moment and never hands it twice."""
        self._outbox.remove(row)
        with self._lock:
            self._handed.discard(row)
