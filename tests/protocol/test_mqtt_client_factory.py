"""make_mqtt_client against a real mosquitto: plain TCP, credentials (URL and explicit), the will, the session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from toco_core.mqtt_client_factory import Will, make_mqtt_client
from toco_core.topics import parse_broker_url

from .conftest import Broker, Listener, wait_until


def connect(client: mqtt.Client, url: str) -> tuple[threading.Event, list]:
    """Connect ``client`` in the background; returns (connected event, CONNACK reason codes seen)."""
    ready, codes = threading.Event(), []

    def on_connect(c, u, flags, rc, p) -> None:
        codes.append(rc)
        if not rc.is_failure:
            ready.set()

    client.on_connect = on_connect
    broker = parse_broker_url(url)
    client.connect_async(broker.host, broker.port, 30)
    client.loop_start()
    return ready, codes


def close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def password_broker():
    """mosquitto that refuses anonymous clients; one user ``dev-1`` with password ``pw1``."""
    auth = Path(tempfile.mkdtemp(prefix="toco-auth-"))
    os.chmod(auth, 0o755)
    passwd = auth / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "dev-1", "pw1"], check=True)
    os.chmod(passwd, 0o644)
    b = Broker(security=["allow_anonymous false", f"password_file {passwd}"])
    b.start()
    yield b
    b.cleanup()
    shutil.rmtree(auth, ignore_errors=True)


def test_plain_tcp_round_trip(broker) -> None:
    """mqtt:// sets no TLS; the client connects and a QoS 1 publish reaches a subscriber."""
    listener = Listener(broker.port, ["f/x"])
    client = make_mqtt_client("plain-1", parse_broker_url(broker.url))
    assert client._ssl_context is None  # no TLS for mqtt:// (paho keeps the context private)
    ready, _ = connect(client, broker.url)
    try:
        assert ready.wait(5)
        client.publish("f/x", b"hello", qos=1).wait_for_publish(5)
        assert wait_until(lambda: listener.on("f/x") == [b"hello"], 5)
    finally:
        close(client)
        listener.close()


def test_tls_only_for_mqtts() -> None:
    """mqtts:// sets a TLS context before any connect (with the system CA store when no CA file is given)."""
    client = make_mqtt_client("tls-1", parse_broker_url("mqtts://broker.example"))
    assert client._ssl_context is not None


@pytest.mark.parametrize("how", ["url", "explicit"])
def test_credentials(password_broker, how) -> None:
    """Credentials from the URL or given explicitly are accepted; a wrong explicit password overrides the URL's."""
    port = password_broker.port
    if how == "url":
        url = f"mqtt://dev-1:pw1@127.0.0.1:{port}"
        client = make_mqtt_client("dev-1", parse_broker_url(url))
    else:
        url = password_broker.url
        client = make_mqtt_client("dev-1", parse_broker_url(url), username="dev-1", password="pw1")
    ready, _ = connect(client, url)
    try:
        assert ready.wait(5), "the broker refused correct credentials"
    finally:
        close(client)

    url = f"mqtt://dev-1:pw1@127.0.0.1:{port}"
    wrong = make_mqtt_client("dev-1b", parse_broker_url(url), password="nope", reconnect_max=1)
    ready, codes = connect(wrong, url)
    try:
        assert wait_until(lambda: bool(codes), 5)
        assert not ready.is_set() and codes[0].is_failure, "the explicit password must override the URL's"
    finally:
        close(wrong)


def test_will_on_abrupt_disconnect(broker) -> None:
    """The will set by the factory is published (retained) when the client's connection drops without DISCONNECT."""
    listener = Listener(broker.port, ["f/will"])
    client = make_mqtt_client("will-1", parse_broker_url(broker.url), will=Will("f/will", b"gone"))
    ready, _ = connect(client, broker.url)
    try:
        assert ready.wait(5)
        assert listener.on("f/will") == []
        client.loop_stop()  # no reconnect: the broker must see the socket die, not a DISCONNECT
        sock = client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        assert wait_until(lambda: listener.on("f/will") == [b"gone"], 5)
        late = Listener(broker.port, ["f/will"])  # the will was retained: a later subscriber gets it too
        try:
            assert wait_until(lambda: late.on("f/will") == [b"gone"], 5)
        finally:
            late.close()
    finally:
        listener.close()


def test_persistent_session_keeps_queued_messages(broker) -> None:
    """persistent_session=True: a QoS 1 message published while the client was away arrives after it reconnects;
    the default (clean) session loses it."""
    for persistent, expect in ((True, [b"queued"]), (False, [])):
        cid = f"sess-{persistent}"
        got: list[bytes] = []
        client = make_mqtt_client(cid, parse_broker_url(broker.url), persistent_session=persistent)
        client.on_message = lambda c, u, m, got=got: got.append(bytes(m.payload))
        ready, _ = connect(client, broker.url)
        assert ready.wait(5)
        client.subscribe("f/sess", 1)
        wait_until(lambda: False, 0.2)  # let the SUBACK arrive
        close(client)
        sender = Listener(broker.port, [])
        sender.publish("f/sess", b"queued")
        sender.close()
        client = make_mqtt_client(cid, parse_broker_url(broker.url), persistent_session=persistent)
        client.on_message = lambda c, u, m, got=got: got.append(bytes(m.payload))
        ready, _ = connect(client, broker.url)
        try:
            assert ready.wait(5)
            wait_until(lambda: got == expect and bool(expect), 2)
            assert got == expect
        finally:
            close(client)
