"""The agent's one MQTT client: paho-mqtt 2.x transport, birth/will, outbox, validated dispatch.

Nothing else in the agent imports paho. The link
- connects with ``connect_async`` + ``loop_start`` (paho reconnects with exponential backoff),
  client id = device id, persistent session so commands sent while offline still arrive;
- on every connect publishes the retained ``online`` birth (StateMessage with a fresh birth
  counter, seq 0) and has a retained ``offline`` will carrying the same birth counter;
- stamps every outgoing agent message with the per-connection sequence number;
- keeps QoS-1 status/drift/samples messages in a sqlite outbox in the state dir until the
  broker acknowledged them, so they survive a broker outage and an agent restart;
- parses a payload only when its topic is one of this device's own (``owns``: its command
  topic, bundle manifests and chunks, or a topic registered by its exact name) and a handler
  of that kind subscribed to it; anything else is dropped with a debug log (amqtt delivers
  retained messages to subscribers whose filter does not match);
- validates every incoming payload with ``parse_message`` on its own dispatcher thread
  (the network thread never runs app code); a bad payload or a failing handler is logged and
  counted, never raised.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from agent.outbox import Outbox
from toco_core.messages import (AgentMessage, ChunkRequest, Message, MessageError, MessageKind, StateMessage, encode,
                                kind_of, parse_message)
from toco_core.topics import DELIVERY, Topics, check_id, parse_broker_url

log = logging.getLogger("toco.agent.mqtt")


def _not_the_outage_again(record: logging.LogRecord) -> bool:
    # paho's loop says "Client is not connected" at ERROR every try while the broker is away;
    # the link already warned once ("disconnected, paho reconnects") and reconnects
    return not record.getMessage().startswith("Client is not connected")


_PAHO_LOG = logging.getLogger("toco.agent.paho")
_PAHO_LOG.addFilter(_not_the_outage_again)

Handler = Callable[[str, Message], None]
_CONNECTED = object()  # dispatcher marker: run the on-connect hooks
_STOP = object()


class MqttLink:
    """Owns the MQTT connection of one device; see the module docstring for the guarantees."""

    def __init__(self, *, url: str, fleet: str, device_id: str, state_dir: str | Path, username: str | None = None,
                 password: str | None = None, ca_file: str | None = None, agent_version: str | None = None,
                 birth: Callable[[], dict] | None = None, keepalive: int = 30, reconnect_min: float = 1.0,
                 reconnect_max: float = 60.0, queue_size: int = 256) -> None:
        """``birth()`` returns extra StateMessage fields (hardware, active) for every birth. Raises ConfigError."""
        self.device_id = check_id(device_id)
        self.topics = Topics(fleet)
        self.broker = parse_broker_url(url)
        self.agent_version = agent_version
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.stats: Counter[str] = Counter()
        self._birth_fn = birth or dict
        self._keepalive = keepalive
        self._outbox = Outbox(self.state_dir / "outbox.sqlite3")
        self._lock = threading.Lock()
        self._handlers: dict[str, tuple[MessageKind, Handler, int]] = {}
        self._hooks: list[Callable[[], None]] = []
        self._mids: dict[int, int | None] = {}  # mid -> outbox row (None: not durable)
        self._early: set[int] = set()  # acks that overtook the registration of their mid
        self._handed: set[int] = set()  # outbox rows given to paho by this process
        self._seq = 0
        self._birth = self._read_birth()
        self._connected = threading.Event()
        self._stopping = False
        self._inbox: queue.Queue = queue.Queue(maxsize=queue_size)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name=f"mqtt-dispatch-{device_id}", daemon=True)
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device_id, clean_session=False,
                                   protocol=mqtt.MQTTv311)
        user = username if username is not None else self.broker.username
        if user:
            self._client.username_pw_set(user, password if password is not None else self.broker.password)
        if self.broker.tls:
            self._client.tls_set(ca_certs=ca_file)
        self._client.reconnect_delay_set(reconnect_min, reconnect_max)  # type: ignore[arg-type]
        self._client.suppress_exceptions = True  # a bug in a callback is logged by paho, the loop lives on
        self._client.enable_logger(_PAHO_LOG)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the next disconnect."""
        return self._connected.is_set()

    @property
    def birth(self) -> int:
        """The birth counter of the current (or next) connection."""
        return self._birth

    def outbox_size(self) -> int:
        """Messages still waiting for the broker's acknowledgement."""
        return len(self._outbox)

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected or ``timeout`` seconds passed; returns whether connected."""
        return self._connected.wait(timeout)

    def start(self) -> None:
        """Start the dispatcher and connect in the background (returns at once)."""
        self._set_will()
        self._dispatcher.start()
        self._client.connect_async(self.broker.host, self.broker.port, self._keepalive)
        self._client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the retained ``offline`` state, disconnect, stop threads, close the outbox."""
        self._stopping = True
        if self.connected:
            info = self._client.publish(self.topics.device(MessageKind.STATE, self.device_id),
                                        encode(self._state("offline")), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=min(timeout, 2.0))
            except (RuntimeError, ValueError):
                log.warning("offline state not acknowledged before disconnect")
        self._client.disconnect()
        self._client.loop_stop()
        self._inbox.put(_STOP)
        if threading.current_thread() is not self._dispatcher and self._dispatcher.is_alive():
            self._dispatcher.join(timeout)
        self._outbox.close()

    # ---- subscriptions ---------------------------------------------------------------------
    def on(self, topic_filter: str, kind: MessageKind | str, handler: Handler, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` (built with ``self.topics``) to ``handler(topic, model)``.

        One handler per filter; registering a filter again replaces its handler.
        """
        with self._lock:
            self._handlers[topic_filter] = (MessageKind(kind), handler, qos)
        if self.connected:
            self._client.subscribe(topic_filter, qos)

    def off(self, topic_filter: str) -> None:
        """Stop routing and unsubscribe ``topic_filter`` (no error when unknown)."""
        with self._lock:
            known = self._handlers.pop(topic_filter, None)
        if known and self.connected:
            self._client.unsubscribe(topic_filter)

    def on_connected(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` on the dispatcher thread after every (re)connect."""
        self._hooks.append(hook)

    # ---- publishing ------------------------------------------------------------------------
    def send(self, message: AgentMessage) -> bool:
        """Send an agent message on its topic with the QoS/retain/outbox rule of topics.DELIVERY.

        Returns True when sent or queued durably, False when dropped because offline (QoS 0
        telemetry, chunk requests: they are re-sent later anyway). Raises MessageError when the
        message claims another device.
        """
        if message.device_id != self.device_id:
            raise MessageError(f"message for device {message.device_id!r} sent through the link of {self.device_id!r}",
                               "build messages with the link's device_id")
        kind = kind_of(message)
        topic = (self.topics.get(message.bundle_id, self.device_id) if isinstance(message, ChunkRequest)
                 else self.topics.device(kind, self.device_id))
        rule = DELIVERY[kind]
        if rule.durable:
            payload = encode(message)
            row = self._outbox.add(topic, kind.value, payload, rule.qos, rule.retain)
            if self.connected:
                self._hand_row(row, topic, kind.value, payload, rule.qos, rule.retain)
            return True
        if not self.connected:
            self.stats["dropped_offline"] += 1
            return False
        self._transmit(topic, message, rule.qos, rule.retain, None)
        return True

    def republish_state(self) -> None:
        """Send the birth again (same birth counter), e.g. after the active model changed."""
        if self.connected:
            self._transmit(self.topics.device(MessageKind.STATE, self.device_id), self._state("online"), 1, True, None)

    def _transmit(self, topic: str, message: AgentMessage, qos: int, retain: bool, row: int | None) -> None:
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
            self._outbox.remove(row)

    def _hand_row(self, row: int, topic: str, kind: str, payload: bytes, qos: int, retain: bool) -> None:
        with self._lock:
            if row in self._handed:
                return
            self._handed.add(row)
        try:
            message = parse_message(kind, payload)
        except MessageError as exc:  # written by an older version: cannot be sent any more
            log.warning("dropping unreadable outbox row", extra={"fields": {"row": row, "error": str(exc)}})
            self._outbox.remove(row)
            return
        self._transmit(topic, message, qos, retain, row)  # type: ignore[arg-type]

    # ---- birth / will ----------------------------------------------------------------------
    def _read_birth(self) -> int:
        path = self.state_dir / "birth"
        try:
            last = int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            last = -1
        return self._write_birth(last + 1)

    def _write_birth(self, value: int) -> int:
        path = self.state_dir / "birth"
        tmp = path.with_name("birth.tmp")
        tmp.write_text(str(value))
        os.replace(tmp, path)
        return value

    def _state(self, state: str) -> StateMessage:
        if state == "offline":
            return StateMessage(device_id=self.device_id, state="offline", birth=self._birth)
        return StateMessage(device_id=self.device_id, state="online", birth=self._birth,
                            agent_version=self.agent_version, **self._birth_fn())

    def _set_will(self) -> None:
        self._client.will_set(self.topics.device(MessageKind.STATE, self.device_id), encode(self._state("offline")),
                              qos=1, retain=True)

    # ---- paho callbacks (network thread: keep them short) ----------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection", extra={"fields": {"reason": str(reason_code)}})
            return
        with self._lock:
            self._seq = 0
            filters = [(f, q) for f, (_, _, q) in self._handlers.items()]
        self._connected.set()
        log.info("connected", extra={"fields": {"broker": self.broker.host, "birth": self._birth}})
        try:
            self._transmit(self.topics.device(MessageKind.STATE, self.device_id), self._state("online"), 1, True, None)
        except Exception:  # a failing birth provider must not keep the link from working
            log.exception("building the birth message failed")
        if filters:
            client.subscribe(filters)
        for row, topic, kind, payload, qos, retain in self._outbox.pending():
            self._hand_row(row, topic, kind, payload, qos, retain)
        self._inbox.put(_CONNECTED)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._stopping:
            return
        if was:  # the next connection is a new birth; its will must say so
            self._birth = self._write_birth(self._birth + 1)
            self._set_will()
        log.warning("disconnected, paho reconnects", extra={"fields": {"reason": str(reason_code)}})

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            if mid in self._mids:
                row = self._mids.pop(mid)
            else:
                self._early.add(mid)
                return
        if row is not None:
            self._outbox.remove(row)
            self.stats["acked"] += 1

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put((msg.topic, msg.payload))

    # ---- dispatcher thread -----------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            if item is _CONNECTED:
                for hook in list(self._hooks):
                    self._run(hook, "on-connect hook")
                continue
            self._dispatch(*item)

    def owns(self, topic: str) -> MessageKind | None:
        """The kind of ``topic`` when this device may receive on it, else None.

        Ours are: this fleet's ``devices/{own id}/cmd`` and its ``bundles/{sha}/manifest`` and
        ``.../chunk/{i}`` topics, plus any topic registered with ``on`` by its exact name (a
        deliberate choice of the caller). Everything else (another device, another fleet, a
        topic the agent publishes itself, a malformed one) is foreign.
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
        if parsed.kind is MessageKind.CMD and parsed.device_id == self.device_id:
            return parsed.kind
        if parsed.kind in (MessageKind.MANIFEST, MessageKind.CHUNK):
            return parsed.kind
        return None

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
            self._run(lambda: handler(topic, message), f"handler for {topic}")

    def _run(self, fn: Callable[[], None], what: str) -> None:
        try:
            fn()
        except Exception:  # a handler bug is logged with its traceback, the link keeps running
            self.stats["handler_errors"] += 1
            log.exception(f"{what} failed")
