"""What the agent's MqttLink does with incoming messages: its handler table and its dispatcher thread.

- a payload is parsed only when its topic is one of this device's own (``owns``: its command
  topic, bundle manifests and chunks, or a topic registered by its exact name) and a handler
  of that kind subscribed to it; anything else is dropped with a debug log (amqtt delivers
  retained messages to subscribers whose filter does not match);
- every incoming payload is validated with ``parse_message`` on the dispatcher thread (the
  network thread never runs app code); a bad payload or a failing handler is logged and
  counted, never raised;
- the on-connect hooks run on that thread too, in order with the messages around them.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from toco_core.messages import MessageError, MessageKind, parse_message
from toco_core.topics import Topics

log = logging.getLogger("toco.agent.mqtt")

Handler = Callable[[str, Any], object]  # called with the parsed message of the kind it was registered for
_CONNECTED = object()  # dispatcher marker: run the on-connect hooks
_STOP = object()


class Dispatcher:
    """Routes one device's incoming messages to their handlers, on a thread of its own."""

    def __init__(self, topics: Topics, device_id: str, stats: Counter[str], queue_size: int) -> None:
        """Counts into the link's ``stats``; the network thread blocks once ``queue_size`` messages wait."""
        self.topics = topics
        self.device_id = device_id
        self.stats = stats
        self._lock = threading.Lock()
        self._handlers: dict[str, tuple[MessageKind, Handler, int]] = {}
        self._hooks: list[Callable[[], None]] = []
        self._inbox: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._loop, name=f"mqtt-dispatch-{device_id}", daemon=True)

    # ---- the handler table -----------------------------------------------------------------
    def route(self, topic_filter: str, kind: MessageKind | str, handler: Handler, qos: int) -> None:
        """Send messages of ``kind`` matching ``topic_filter`` to ``handler``, replacing an earlier one.

        Raises ValueError for an unknown kind.
        """
        with self._lock:
            self._handlers[topic_filter] = (MessageKind(kind), handler, qos)

    def unroute(self, topic_filter: str) -> bool:
        """Forget ``topic_filter``'s handler; returns whether there was one."""
        with self._lock:
            return self._handlers.pop(topic_filter, None) is not None

    def filters(self) -> list[tuple[str, int]]:
        """(filter, qos) of every routed filter, for subscribing them all again after a connect."""
        with self._lock:
            return [(f, q) for f, (_, _, q) in self._handlers.items()]

    def add_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` on the dispatcher thread after every ``connected()``."""
        self._hooks.append(hook)

    def owns(self, topic: str) -> MessageKind | None:
        """The kind of ``topic`` when this device may receive on it, else None.

        Ours are: this fleet's ``devices/{own id}/cmd``, its ``bundles/{sha}/manifest`` and
        ``.../chunk/{i}`` topics and ``bundles/{sha}/part/{own id}``, plus any topic routed by its
        exact name (a deliberate choice of the caller). Everything else (another device, another
        fleet, a topic the agent
        publishes itself, a malformed one) is foreign.
        """
        with self._lock:
            exact = self._handlers.get(topic)
        try:
            parsed = self.topics.parse(topic)
        except MessageError:
            parsed = None
        if exact is not None and (parsed is None or parsed.kind is exact[0]):
            return exact[0]
        if parsed is None:
            return None
        if parsed.kind in (MessageKind.CMD, MessageKind.PART) and parsed.device_id == self.device_id:
            return parsed.kind
        if parsed.kind in (MessageKind.MANIFEST, MessageKind.CHUNK):
            return parsed.kind
        return None

    # ---- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the dispatcher thread."""
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Let the thread finish what is queued and end; waits up to ``timeout`` s unless called on that thread."""
        self._inbox.put(_STOP)
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout)

    def put(self, topic: str, payload: bytes) -> None:
        """Queue a received message (network thread: no parsing here); blocks while the queue is full."""
        self._inbox.put((topic, payload))

    def connected(self) -> None:
        """Queue a run of the on-connect hooks, after the messages already queued."""
        self._inbox.put(_CONNECTED)

    def _loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            if item is _CONNECTED:
                for hook in list(self._hooks):
                    self._run(hook, "on-connect hook")
                continue
            self._dispatch(*item)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        self.stats["received"] += 1
        # A broker may deliver what no filter of ours matches (amqtt does with retained messages):
        # only a topic of our own, routed to a handler of that very kind, is ever parsed.
        kind = self.owns(topic)
        with self._lock:
            routes = [(k, h) for f, (k, h, _) in self._handlers.items()
                      if k is kind and mqtt.topic_matches_sub(f, topic)]
        if kind is None or not routes:
            self.stats["foreign"] += 1
            log.debug("dropped a message on a topic that is not ours", extra={"fields": {"topic": topic}})
            return
        if not payload:  # an empty payload clears a retained topic; nothing to handle
            self.stats["ignored"] += 1
            return
        for kind, handler in routes:
            try:
                message = parse_message(kind, payload)
            except MessageError as exc:
                self.stats["dropped"] += 1
                log.warning("dropped invalid payload", extra={"fields": {"topic": topic, "error": str(exc)}})
                continue
            self._run(lambda: handler(topic, message), f"handler for {topic}")  # noqa: B023 - run at once

    def _run(self, fn: Callable[[], object], what: str) -> None:
        try:
            fn()
        except Exception:  # a handler bug is logged with its traceback, the link keeps running
            self.stats["handler_errors"] += 1
            log.exception(f"{what} failed")
