"""The one place a paho-mqtt client is built: the agent's link, the server's client and the bundle server use it.

Only the settings all three share live here (callback API v2, MQTT 3.1.1 or 5, client id, session
kind, credentials, TLS, reconnect backoff, an optional will, manual acknowledgement). Callbacks,
in-flight windows and logging stay with each caller, which knows what its traffic needs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from toco_core.topics import BrokerUrl


class Will(NamedTuple):
    """The message the broker publishes for a client that vanishes without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def make_mqtt_client(client_id: str, broker: BrokerUrl, *, username: str | None = None, password: str | None = None,
                     ca_file: str | None = None, persistent_session: bool = False, reconnect_min: float = 1.0,
                     reconnect_max: float = 10.0, will: Will | None = None, session_expiry_s: int | None = None,
                     manual_ack: bool = False) -> mqtt.Client:
    """Build a configured, not yet connected paho client (callback API v2, MQTT 3.1.1, or 5 for a session expiry).

    Takes: ``client_id``; ``broker`` from ``toco_core.topics.parse_broker_url`` (host, port, TLS
    and URL credentials); ``username``/``password`` that override the URL's (a password without a
    username is ignored, as is a username of ""); ``ca_file`` for ``mqtts://`` (None means the
    system's CA store); ``persistent_session`` for a broker-held session (clean_session=False) so
    QoS 1 messages queued while the client was away arrive after a reconnect; ``reconnect_min`` /
    ``reconnect_max`` seconds for paho's exponential reconnect backoff; ``will`` set before the
    first connect (callers whose will changes per connection call ``client.will_set`` themselves);
    ``session_expiry_s`` for an MQTT 5 client whose broker-held session outlives a disconnect by that
    many seconds (connect it with ``**session_connect_args(session_expiry_s)``); ``manual_ack`` to send each
    QoS 1 PUBACK with ``client.ack(mid, qos)`` instead of when ``on_message`` returns.
    Returns the client; the caller sets its callbacks, then ``connect_async`` + ``loop_start``.
    Raises nothing of its own; paho raises ValueError on an invalid will topic or QoS.
    """
    client: mqtt.Client
    if session_expiry_s is not None:
        # MQTT 5: a session that survives the client's death, but not forever (a shared-subscription
        # member's session keeps being handed its share of the messages while it is away)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                             manual_ack=manual_ack)
    else:
        # clean_session=None is paho's own default for 3.1.1 (a clean session); passing True would be the same
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=False if persistent_session else None, protocol=mqtt.MQTTv311,
                             manual_ack=manual_ack)
    user = username if username is not None else broker.username
    if user:
        client.username_pw_set(user, password if password is not None else broker.password)
    if broker.tls:
        client.tls_set(ca_certs=ca_file)
    # paho's stub types the delays as int; it accepts floats (the agent's tests use sub-second delays)
    client.reconnect_delay_set(reconnect_min, reconnect_max)  # type: ignore[arg-type]
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    return client


def session_connect_args(session_expiry_s: int | None, receive_maximum: int | None = None) -> dict[str, Any]:
    """The ``connect_async`` keyword arguments that resume a broker-held MQTT 5 session.

    Takes the ``session_expiry_s`` the client was built with and the QoS 1 messages the broker may send
    it unacknowledged (``receive_maximum``, 1-65,535; None: the broker's choice, mosquitto's
    ``max_inflight_messages``). Returns ``{}`` for None (an MQTT 3.1.1 client, whose session kind is
    fixed at construction), else ``clean_start=False`` (paho's default starts clean on the first
    connect, which would throw away what the broker kept for a restarted process) and the session
    expiry (and receive maximum) as CONNECT properties. Raises nothing.
    """
    if session_expiry_s is None:
        return {}
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho's constructor is untyped
    props.SessionExpiryInterval = int(session_expiry_s)
    if receive_maximum is not None:
        props.ReceiveMaximum = int(receive_maximum)
    return {"clean_start": False, "properties": props}
