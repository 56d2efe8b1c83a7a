"""The agent's one MQTT client: paho-mqtt 2.x transport, birth/will, outbox, validated dispatch.

Nothing else in the agent imports paho but the link's two parts: agent.mqtt_publisher
(outgoing) and agent.mqtt_dispatch (incoming). The link
- connects with ``connect_async`` + ``loop_start`` (paho reconnects with exponential backoff),
  client id = device id, persistent session so commands sent while offline still arrive;
- on every connect publishes the retained ``online`` birth (StateMessage with a fresh birth
  counter, seq 0) and has a retained ``offline`` will carrying the same birth counter;
- stamps every outgoing agent message with the per-connection sequence number;
- keeps QoS-1 status/drift/samples messages in a sqlite outbox in the state dir until the
  broker acknowledged them, so they survive a broker outage and an agent restart;
- parses only payloads on this device's own topics, validated, on a dispatcher thread of its
  own; a bad payload or a failing handler is logged and counted, never raised (agent.mqtt_dispatch).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt_dispatch import Dispatcher, Handler
from agent.mqtt_publisher import Publisher
from agent.outbox import Outbox
from toco_core.atomic_files import atomic_write
from toco_core.messages import (
    AgentMessage,
    ChunkRequest,
    MessageError,
    MessageKind,
    PartRequest,
    StateMessage,
    encode,
    kind_of,
)
from toco_core.mqtt_client_factory import make_mqtt_client
from toco_core.topics import DELIVERY, Topics, check_id, parse_broker_url

log = logging.getLogger("toco.agent.mqtt")


def _not_the_outage_again(record: logging.LogRecord) -> bool:
    # paho's loop says "Client is not connected" at ERROR every try while the broker is away;
    # the link already warned once ("disconnected, paho reconnects") and reconnects
    return not record.getMessage().startswith("Client is not connected")


_PAHO_LOG = logging.getLogger("toco.agent.paho")
_PAHO_LOG.addFilter(_not_the_outage_again)


class MqttLink:
    """Owns the MQTT connection of one device; see the module docstring for the guarantees."""

    def __init__(self, *, url: str, fleet: str, device_id: str, state_dir: str | Path, username: str | None = None,
                 password: str | None = None, ca_file: str | None = None, agent_version: str | None = None,
                 birth: Callable[[], dict[str, Any]] | None = None, keepalive: int = 30, reconnect_min: float = 1.0,
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
        self._dispatcher = Dispatcher(self.topics, self.device_id, self.stats, queue_size)
        self._birth = self._read_birth()
        self._connected = threading.Event()
        self._connections = 0  # successful CONNACKs so far: which connection a request went out on
        self._stopping = False
        # a persistent session: commands queued while the device was away arrive after it reconnects.
        # The will is set in start() and after each disconnect: it carries the birth of its connection.
        self._client = make_mqtt_client(self.device_id, self.broker, username=username, password=password,
                                        ca_file=ca_file, persistent_session=True, reconnect_min=reconnect_min,
                                        reconnect_max=reconnect_max)
        self._client.suppress_exceptions = True  # a bug in a callback is logged by paho, the loop lives on
        self._client.enable_logger(_PAHO_LOG)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._publisher = Publisher(self._client, self._outbox, self.stats)

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the next disconnect."""
        return self._connected.is_set()

    @property
    def connection(self) -> int:
        """The number of the current (or last) connection, counting from 1; 0 before the first. The on-connect
        hooks run on the dispatcher thread a moment after it begins: a hook compares it with the number a request
        was sent on to tell a new connection from the one that request already used."""
        return self._connections

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
        self._dispatcher.stop(timeout)
        self._outbox.close()

    # ---- subscriptions ---------------------------------------------------------------------
    def on(self, topic_filter: str, kind: MessageKind | str, handler: Handler, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` (built with ``self.topics``) to ``handler(topic, model)``.

        One handler per filter; registering a filter again replaces its handler.
        """
        self._dispatcher.route(topic_filter, kind, handler, qos)
        if self.connected:
            self._client.subscribe(topic_filter, qos)

    def off(self, topic_filter: str) -> None:
        """Stop routing and unsubscribe ``topic_filter`` (no error when unknown)."""
        known = self._dispatcher.unroute(topic_filter)
        if known and self.connected:
            self._client.unsubscribe(topic_filter)

    def on_connected(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` on the dispatcher thread after every (re)connect."""
        self._dispatcher.add_hook(hook)

    # ---- publishing ------------------------------------------------------------------------
    def send(self, message: AgentMessage) -> bool:
        """Send an agent message on its topic with the QoS/retain/outbox rule of topics.DELIVERY.

        Returns True when sent or queued durably, False when dropped because offline (telemetry,
        chunk requests: the next point replaces it, a request is sent again). Raises MessageError when the
        message claims another device.
        """
        if message.device_id != self.device_id:
            raise MessageError(f"message for device {message.device_id!r} sent through the link of {self.device_id!r}",
                               "build messages with the link's device_id")
        kind = kind_of(message)
        topic = (self.topics.get(message.bundle_id, self.device_id) if isinstance(message, (ChunkRequest, PartRequest))
                 else self.topics.device(kind, self.device_id))
        rule = DELIVERY[kind]
        if rule.durable:
            payload = encode(message)
            row = self._outbox.add(topic, kind.value, payload, rule.qos, rule.retain)
            if self.connected:
                self._publisher.hand_row(row, topic, kind.value, payload, rule.qos, rule.retain)
            return True
        if not self.connected:
            self.stats["dropped_offline"] += 1
            return False
        self._publisher.transmit(topic, message, rule.qos, rule.retain, None)
        return True

    def republish_state(self) -> None:
        """Send the birth again (same birth counter), e.g. after the active model changed."""
        if self.connected:
            self._publisher.transmit(self.topics.device(MessageKind.STATE, self.device_id), self._state("online"), 1,
                                     True, None)

    # ---- birth / will ----------------------------------------------------------------------
    def _read_birth(self) -> int:
        path = self.state_dir / "birth"
        try:
            last = int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            last = -1
        return self._write_birth(last + 1)

    def _write_birth(self, value: int) -> int:
        atomic_write(self.state_dir / "birth", str(value).encode())
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
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection", extra={"fields": {"reason": str(reason_code)}})
            return
        self._publisher.restart_seq()
        filters = self._dispatcher.filters()
        self._connections += 1
        self._connected.set()
        log.info("connected", extra={"fields": {"broker": self.broker.host, "birth": self._birth}})
        try:
            self._publisher.transmit(self.topics.device(MessageKind.STATE, self.device_id), self._state("online"), 1,
                                     True, None)
        except Exception:  # a failing birth provider must not keep the link from working
            log.exception("building the birth message failed")
        if filters:
            client.subscribe(filters)
        for row, topic, kind, payload, qos, retain in self._outbox.pending():
            self._publisher.hand_row(row, topic, kind, payload, qos, retain)
        self._dispatcher.connected()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._stopping:
            return
        if was:  # the next connection is a new birth; its will must say so
            self._birth = self._write_birth(self._birth + 1)
            self._set_will()
        log.warning("disconnected, paho reconnects", extra={"fields": {"reason": str(reason_code)}})

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Properties) -> None:
        self._publisher.acked(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._dispatcher.put(msg.topic, bytes(msg.payload))

    # ---- incoming (agent.mqtt_dispatch) ----------------------------------------------------
    def owns(self, topic: str) -> MessageKind | None:
        """The kind of ``topic`` when this device may receive on it, else None (which are ours: Dispatcher.owns)."""
        return self._dispatcher.owns(topic)
