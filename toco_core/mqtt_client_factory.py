"""The one place a paho-mqtt client is built: the agent's link, the server's client and the bundle server use it.

Only the settings all three share live here (callback API v2, MQTT 3.1.1, client id, session
kind, credentials, TLS, reconnect backoff, an optional will). Callbacks, in-flight windows and
logging stay with each caller, which knows what its traffic needs.
"""

from __future__ import annotations

from typing import NamedTuple

import paho.mqtt.client as mqtt

from toco_core.topics import BrokerUrl


class Will(NamedTuple):
    """The message the broker publishes for a client that vanishes without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def make_mqtt_client(client_id: str, broker: BrokerUrl, *, username: str | None = None, password: str | None = None,
                     ca_file: str | None = None, persistent_session: bool = False, reconnect_min: float = 1.0,
                     reconnect_max: float = 10.0, will: Will | None = None) -> mqtt.Client:
    """Build a configured, not yet connected paho client (callback API v2, MQTT 3.1.1).

    Takes: ``client_id``; ``broker`` from ``toco_core.topics.parse_broker_url`` (host, port, TLS
    and URL credentials); ``username``/``password`` that override the URL's (a password without a
    username is ignored, as is a username of ""); ``ca_file`` for ``mqtts://`` (None means the
    system's CA store); ``persistent_session`` for a broker-held session (clean_session=False) so
    QoS 1 messages queued while the client was away arrive after a reconnect; ``reconnect_min`` /
    ``reconnect_max`` seconds for paho's exponential reconnect backoff; ``will`` set before the
    first connect (callers whose will changes per connection call ``client.will_set`` themselves).
    Returns the client; the caller sets its callbacks, then ``connect_async`` + ``loop_start``.
    Raises nothing of its own; paho raises ValueError on an invalid will topic or QoS.
    """
    # clean_session=None is paho's own default for 3.1.1 (a clean session); passing True would be the same
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=False if persistent_session else None, protocol=mqtt.MQTTv311)
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
