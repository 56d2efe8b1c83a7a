"""A real mosquitto on a free loopback port, plus small helpers for the protocol tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

MOSQUITTO = "/usr/sbin/mosquitto"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    """Poll ``cond`` until true or ``timeout`` s; returns the last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


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
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        if not wait_until(self._listening, 10):
            self.stop()
            raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {self.proc.stdout.read().decode(errors='replace')}")
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A fresh mosquitto for one test."""
    if not os.path.exists(MOSQUITTO):
        pytest.fail(f"{MOSQUITTO} is missing: apt-get install mosquitto (make system-deps)")
    b = Broker()
    b.start()
    yield b
    b.cleanup()


class Listener:
    """A plain paho client that records every message on some filters (the test's eyes on the broker)."""

    def __init__(self, url_port: int, filters: list[str]) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"listener-{time.monotonic_ns()}")
        self.client.on_connect = lambda c, u, f, rc, p: (filters and c.subscribe([(t, 1) for t in filters]),
                                                         self.ready.set())
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", url_port)
        self.client.loop_start()
        self.ready.wait(5)
        time.sleep(0.1)  # let the SUBACK arrive

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def on(self, suffix: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
