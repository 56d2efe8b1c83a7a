"""The embedded MQTT broker (amqtt, in process): the one-machine default.

amqtt is asyncio; it runs on its own event loop in a daemon thread so the rest of the
server (paho, uvicorn, the job runner) does not care where the broker lives. An external
broker (``mqtt://host:port``, mosquitto in production) is used the same way: the server's
MQTT client only ever sees a URL.

Without credentials it admits anyone who reaches it, so it listens on 127.0.0.1 alone; any other
address (127.0.0.2 and 0.0.0.0 included) needs a password file (amqtt's format, argon2 hashes:
see ``password_line``). Even then it has no ACL: every client reads every topic. Plant networks
use mosquitto with the shipped config (deploy/mosquitto).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path
from typing import Any

from toco_core.errors import ConfigError

log = logging.getLogger("toco.fleet.broker")
LOOPBACK = "127.0.0.1"  # the one address an anonymous embedded broker may listen on


class BrokerBindError(ConfigError):
    """Raised when the embedded broker is asked to listen beyond 127.0.0.1 without credentials."""


def check_bind(host: str, password_file: Path | None) -> None:
    """Refuse an anonymous embedded broker on any address but 127.0.0.1.

    Takes the bind address and the broker's password file (None: anonymous). Raises
    BrokerBindError for another address without a password file, ConfigError when the password
    file is missing. Other loopback addresses are refused too: they are one alias or one
    forwarded port away from a network, and an anonymous broker gives every topic to anyone.
    """
    if password_file is not None:
        if not Path(password_file).is_file():
            raise ConfigError(f"the embedded broker's password file {password_file} does not exist",
                              "create it (deploy/README.md, embedded broker) or leave --broker-password-file out")
        return
    if host != LOOPBACK:
        raise BrokerBindError(f"the embedded broker admits anonymous clients and may listen on {LOOPBACK} only, "
                              f"not {host}", "give it --broker-password-file, or run mosquitto with "
                              "deploy/mosquitto/toco.conf and --broker mqtts://host:8883")


def password_line(user: str, password: str) -> str:
    """One line of the embedded broker's password file: ``user:argon2-hash`` (amqtt's FileAuthPlugin format).

    Raises ConfigError for a user or password containing ':' or a newline, or an empty password.
    """
    from pwdlib.hashers.argon2 import Argon2Hasher  # amqtt's own dependency, used by its FileAuthPlugin

    if not password or any(c in user + password for c in ":\n") or not user:
        raise ConfigError("a broker user and password may not be empty or contain ':' or a newline")
    return f"{user}:{Argon2Hasher().hash(password)}"


class EmbeddedBroker:
    """amqtt listening on ``host:port``; ``url`` is what the MQTT clients connect to."""

    def __init__(self, host: str = LOOPBACK, port: int = 1883, password_file: Path | None = None) -> None:
        """Raises BrokerBindError for a bind address beyond 127.0.0.1 without ``password_file`` (check_bind)."""
        check_bind(host, password_file)
        self.host, self.port, self.password_file = host, port, password_file
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None  # amqtt.broker.Broker (amqtt ships no types)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the listener."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Start the broker thread and wait until it listens. Raises ConfigError when the port is taken."""
        with socket.socket() as s:
            if s.connect_ex((self.host, self.port)) == 0:
                raise ConfigError(f"port {self.port} on {self.host} is already in use; "
                                  "the embedded broker cannot listen",
                                  "stop the other broker, pick --broker-port, or use --broker mqtt://host:port")
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise ConfigError(f"the embedded broker did not start on {self.host}:{self.port}: {self._error}",
                              "use an external broker with --broker mqtt://host:port")

    def _run(self) -> None:
        from amqtt.broker import Broker

        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        auth: dict[str, dict[str, Any]]
        if self.password_file is None:  # check_bind made sure this is 127.0.0.1
            auth = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        else:
            auth = {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(self.password_file)}}
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 0}},
            "plugins": auth,
        }
        try:
            self._broker = Broker(config, loop=self._loop)
            self._loop.run_until_complete(self._broker.start())
        except BaseException as exc:  # reported to start() through _error
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down and join its thread."""
        if self._loop is None or self._broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            fut.result(timeout)
        except Exception as exc:  # a slow shutdown must not hang the server's exit
            log.warning("embedded broker shutdown failed", extra={"fields": {"error": repr(exc)}})
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._broker = None
