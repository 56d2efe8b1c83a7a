"""The server's one MQTT client: owns the transport, the topic prefix and the subscriptions.

paho 2.x, callback API v2, ``connect_async`` + ``loop_start`` so paho reconnects by itself.
Device messages go to the Ingest queue (the network thread never touches the DB); chunk
requests are answered on the spot by the BundlePublisher, which needs no DB.

With replicas (``shared_group`` set) the device topics and chunk requests are subscribed as
``$share/{group}/{filter}``: the broker hands each message to one replica of the group, so each is
stored (and each chunk request answered) once. The relay topic (fleet_server.event_relay) is
subscribed plainly: every replica hears every other replica's dashboard events.

QoS 1 device messages are acknowledged only once the ingest batch holding them is committed
(paho's manual acknowledgement): a server killed with messages still queued leaves them un-acked,
and the broker delivers them again. That needs a session the broker keeps across the server's
death (``session_expiry_s``: MQTT 5, clean_start=False) under a client id that the restarted
process asks for again. Everything else (chunk requests, relayed events) is acknowledged as soon
as it has been handled. A PUBACK names a packet id of one connection: an acknowledgement that
comes after the connection it arrived on has dropped is not sent (the broker delivers the
message again on the new connection, and ingest recognises it).

Publishing: paho numbers a QoS 1 publish with a packet id (1-65,535) that stays taken until the
broker's PUBACK, and refuses a publish whose id is still taken (MQTT_ERR_QUEUE_SIZE). A refused
QoS 1 publish raises PublishRefused (a deploy wave is then not marked sent: fleet_server.deployment_waves;
a drift-policy command is kept for the leader's tick: fleet_server.command_outbox);
a QoS 0 publish refused or made while disconnected is gone and only counted (the downloader asks
again). ``stats`` holds those counts for /api/health.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable

import paho.mqtt.client as mqtt

from toco_core.errors import TocoError
from toco_core.messages import Message, MessageError, MessageKind, encode
from toco_core.mqtt_client_factory import make_mqtt_client, session_connect_args
from toco_core.topics import DELIVERY, Topics, parse_broker_url

log = logging.getLogger("toco.fleet.mqtt")
INGEST_KINDS = (MessageKind.STATE, MessageKind.TELEMETRY, MessageKind.STATUS, MessageKind.DRIFT, MessageKind.SAMPLES)
Ack = Callable[[], None]  # acknowledges one received QoS 1 message to the broker (a no-op for QoS 0)
DeviceHandler = Callable[[MessageKind, str, bytes, Ack, bool], None]  # (kind, device, payload, ack, redelivered)
# QoS 1 messages the broker may have out to this client unacknowledged (MQTT 5 Receive Maximum, at most 65,535).
# Device messages are acknowledged only after their batch commits, so the window holds the ingest backlog; at
# mosquitto's max_inflight_messages (1,000 as shipped) a replica alone under 10,000 devices' QoS 1 telemetry
# had it full and the broker queued everything behind it, part requests included: a request waited for the
# backlog. With the window at the protocol's maximum the backlog waits in the ingest queue (in memory: ~300
# bytes a message) and a request is answered when it arrives. bench/fleet.py, 10,000 devices, the survivor
# deploying to 2,000 alone: part ranges asked for again 147,104 -> 0, oldest request 16.7 -> 9.3 s.
RECEIVE_MAXIMUM = 65535


def ingest_subscriptions(topics: Topics, shared_group: str | None) -> list[tuple[str, int]]:
    """The (filter, QoS) pairs a replica's ingest subscribes: device kinds and chunk requests, inside
    ``$share/{shared_group}/`` when replicas share them. Takes the topic scheme and the group (None: one
    process). Returns the list; raises nothing. fleet_server.session_drain leaves the same filters."""
    subs = [(topics.device(k), DELIVERY[k].qos) for k in INGEST_KINDS]
    subs.append((topics.get(), DELIVERY[MessageKind.GET].qos))
    if shared_group is not None:
        subs = [(f"$share/{shared_group}/{topic}", qos) for topic, qos in subs]
    return subs


class PublishRefused(TocoError):
    """paho refused a QoS 1 publish (every packet id is taken by a publish the broker has not acknowledged)."""


class FleetMqtt:
    """Connects to ``url``; ``on_device(kind, device_id, payload, ack, redelivered)`` and ``on_get(topic, payload)``
    receive traffic. ``on_device`` owns ``ack``: it calls it once the message is safely stored (or given up on);
    ``redelivered`` is the PUBLISH's DUP flag (sent before, perhaps to a replica that stored it and died)."""

    def __init__(self, url: str, topics: Topics, *, on_device: DeviceHandler,
                 on_get: Callable[[str, bytes], None], on_connect: Callable[[], None] | None = None,
                 client_id: str = "toco-fleet-server", username: str | None = None, password: str | None = None,
                 ca_file: str | None = None, shared_group: str | None = None,
                 on_relay: Callable[[bytes], None] | None = None, session_expiry_s: int | None = None) -> None:
        """``shared_group``: subscribe ingest and chunk requests as ``$share/{group}/...`` (replicas);
        ``on_relay(payload)`` receives the other replicas' events on ``topics.server_events()``;
        ``session_expiry_s``: keep the broker-held session (MQTT 5) that long after a disconnect, so a
        restarted server under the same ``client_id`` gets the messages it never acknowledged (None:
        MQTT 3.1.1 and a clean session, as the embedded broker needs)."""
        self.broker = parse_broker_url(url)
        self.shared_group, self.on_relay = shared_group, on_relay
        self.topics = topics
        self.on_device, self.on_get, self.on_connected = on_device, on_get, on_connect
        self.connected = threading.Event()
        self.session_expiry_s = session_expiry_s
        # refused, dropped_disconnected (QoS 0 gone), queued_disconnected (QoS 1 kept by paho for the reconnect)
        self.stats: Counter[str] = Counter()
        self._last_qos0: mqtt.MQTTMessageInfo | None = None  # for wait_written
        # which connection a packet id belongs to: bumped (under the lock) on every connect and disconnect
        self._ack_lock = threading.Lock()
        self._connection = 0
        self.client = make_mqtt_client(client_id, self.broker, username=username, password=password, ca_file=ca_file,
                                       reconnect_min=1, reconnect_max=10, session_expiry_s=session_expiry_s,
                                       manual_ack=True)
        # a burst of 1,000 births must not be throttled by paho's default in-flight window
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def start(self, timeout: float = 10.0) -> None:
        """Connect in the background and wait up to ``timeout`` s. Raises TimeoutError if the broker is unreachable."""
        self.client.connect_async(self.broker.host, self.broker.port, 30,
                                  **session_connect_args(self.session_expiry_s, RECEIVE_MAXIMUM))
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise TimeoutError(f"the fleet server could not reach the broker at {self.broker.host}:{self.broker.port}")

    def stop(self, timeout: float = 2.0) -> None:
        """Disconnect and stop paho's network thread, within about ``timeout`` seconds whatever the broker does.

        paho's thread ends only once its output queue is written (the DISCONNECT waits behind every queued
        packet) and ``loop_stop`` joins it without a limit: a slow or frozen broker would hold the process.
        After ``timeout`` the socket is shut down, which ends the thread at once; publishes not yet written
        are lost (QoS 1 device messages not acknowledged are delivered again to the next session).
        Returns None; raises nothing.
        """
        self.client.disconnect()
        stopper = threading.Thread(target=self.client.loop_stop, name="mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(timeout)
        if stopper.is_alive():
            sock = self.client.socket()
            log.warning("the broker did not take the disconnect in time; closing the connection",
                        extra={"fields": {"timeout_s": timeout}})
            if isinstance(sock, socket.socket):  # an SSL socket is one too
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # not close(): paho's thread may still select() on it
            stopper.join(2)

    def send(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        """Raw publish (the BundlePublisher's SendFn). Returns True when paho took it: written to the socket,
        or for QoS 1 queued (while disconnected: until the reconnect); False for a QoS 0 publish that is gone
        (counted). Raises PublishRefused when paho refuses a QoS 1 publish."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        rc = info.rc
        if rc == mqtt.MQTT_ERR_SUCCESS:
            if qos == 0:
                self._last_qos0 = info
            return True
        if rc == mqtt.MQTT_ERR_NO_CONN:
            # QoS 1 stays in paho's queue and goes out after the reconnect; QoS 0 is lost
            self.stats["queued_disconnected" if qos else "dropped_disconnected"] += 1
            return qos > 0
        self.stats["refused"] += 1
        if qos == 0:
            return False
        log.warning("publish refused", extra={"fields": {"topic": topic, "rc": int(rc)}})
        raise PublishRefused(f"the MQTT client refused to publish on {topic}: {mqtt.error_string(rc)} (every packet "
                             "id is taken by a QoS 1 publish the broker has not acknowledged yet)",
                             "it is sent again once the broker catches up; if it persists, check the broker's "
                             "health and GET /api/health (mqtt.refused)")

    def wait_written(self, timeout: float = 10.0) -> bool:
        """Block until the last QoS 0 publish taken is written to the socket (or ``timeout`` s, or the connection
        dropped it). Returns whether it was written. Part serving calls it after each request, so a backlog of
        frames waits as requests, not as bytes in paho's memory."""
        info = self._last_qos0
        if info is None:
            return True
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):  # not queued, or the connection went away: nothing more to wait for
            return False
        return info.is_published()

    def send_command(self, device_id: str, command: Message) -> None:
        """Publish a server command on ``devices/{id}/cmd`` with the protocol's QoS. Raises PublishRefused."""
        rule = DELIVERY[MessageKind.CMD]
        self.send(self.topics.device(MessageKind.CMD, device_id), encode(command), rule.qos, rule.retain)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the fleet server", extra={"fields": {"reason": str(reason_code)}})
            return
        with self._ack_lock:
            self._connection += 1
        if self.session_expiry_s is not None:
            log.info("broker session", extra={"fields": {"resumed": bool(flags.session_present)}})
        subs = ingest_subscriptions(self.topics, self.shared_group)
        if self.on_relay is not None:
            subs.append((self.topics.server_events(), 0))
        client.subscribe(subs)
        self.connected.set()
        if self.on_connected is not None:
            self.on_connected()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._ack_lock:
            self._connection += 1
        self.connected.clear()
        level = logging.WARNING if reason_code.is_failure else logging.INFO  # our own stop() is not news
        log.log(level, "disconnected from the broker", extra={"fields": {"reason": str(reason_code)}})

    def _acker(self, msg: mqtt.MQTTMessage) -> Ack:
        """The acknowledgement of ``msg``, bound to the connection it arrived on."""
        if msg.qos == 0:
            return _no_ack
        mid, qos = msg.mid, msg.qos
        with self._ack_lock:
            connection = self._connection

        def ack() -> None:
            with self._ack_lock:
                # a packet id names a message of one connection only: on a newer one it may name another
                if connection == self._connection:
                    self.client.ack(mid, qos)
        return ack

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        ack = self._acker(msg)
        try:
            if self._dispatch(msg, ack):
                return  # ingest owns the acknowledgement now
        except Exception:  # never let one message take the network thread down
            log.exception("handling a message failed", extra={"fields": {"topic": msg.topic}})
        ack()

    def _dispatch(self, msg: mqtt.MQTTMessage, ack: Ack) -> bool:
        """Hand ``msg`` to its handler. Returns True when ingest took it (and will call ``ack``)."""
        if self.on_relay is not None and msg.topic == self.topics.server_events():
            try:
                self.on_relay(bytes(msg.payload))
            except Exception:
                log.exception("a relayed event could not be delivered")
            return False
        try:
            where = self.topics.parse(msg.topic)
        except MessageError as exc:
            log.warning("message on an unknown topic dropped",
                        extra={"fields": {"topic": msg.topic, "error": str(exc)}})
            return False
        if where.kind is MessageKind.GET:
            self.on_get(msg.topic, bytes(msg.payload))
        elif where.kind in INGEST_KINDS:
            assert where.device_id is not None  # a device topic names the device
            self.on_device(where.kind, where.device_id, bytes(msg.payload), ack, bool(msg.dup))
            return True
        return False


def _no_ack() -> None:
    """QoS 0 messages have no acknowledgement."""
