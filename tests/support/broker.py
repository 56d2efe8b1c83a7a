"""A real mosquitto on a free loopback port, and a plain paho client that watches it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from tests.support.processes import free_port, stop_process
from tests.support.waiting import wait_until

MOSQUITTO = "/usr/sbin/mosquitto"


class Broker:
    """mosquitto with its own config in a temp dir; stop() and start() keep the same port."""

    def __init__(self, security: list[str] | None = None) -> None:
        """``security`` replaces ``allow_anonymous true`` (e.g. password_file and acl_file lines)."""
        self.dir = Path(tempfile.mkdtemp(prefix="toco-mosq-"))
        os.chmod(self.dir, 0o755)  # run as root, mosquitto drops to user mosquitto
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", *(security or ["allow_anonymous true"]), "persistence false",
                 "log_dest stdout", "log_type error", "log_type warning"]
        self.conf.write_text("\n".join(lines) + "\n")
        os.chmod(self.conf, 0o644)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Returns the ``mqtt://127.0.0.1:<port>`` URL of this broker."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start mosquitto and wait until it listens. Raises RuntimeError if it exits or does not listen in 10 s."""
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        if not wait_until(self._listening, 10):
            self.stop()
            raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            out = self.proc.stdout.read() if self.proc.stdout else b""
            raise RuntimeError(f"mosquitto exited: {out.decode(errors='replace')}")
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM, SIGKILL after 5 s); start() brings it back on the same port."""
        stop_process(self.proc, 5)
        self.proc = None

    def cleanup(self) -> None:
        """Stop mosquitto and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Listener:
    """A plain paho client that records every message on some filters (the test's eyes on the broker)."""

    def __init__(self, url_port: int, filters: list[str]) -> None:
        """Connect to 127.0.0.1:``url_port`` and subscribe to ``filters`` at QoS 1 (waits up to 5 s)."""
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"listener-{time.monotonic_ns()}")

        def on_connect(c, u, f, rc, p):
            if filters:
                c.subscribe([(t, 1) for t in filters])
            self.ready.set()

        self.client.on_connect = on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", url_port)
        self.client.loop_start()
        self.ready.wait(5)
        time.sleep(0.1)  # let the SUBACK arrive

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def on(self, suffix: str) -> list[bytes]:
        """Returns the payloads seen so far on topics ending with ``suffix``, in arrival order."""
        with self.lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish at QoS 1 and wait up to 5 s for the PUBACK."""
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()
