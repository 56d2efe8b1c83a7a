"""The embedded MQTT broker (amqtt, in process): the one-machine default.

amqtt is asyncio; it runs on its own event loop in a daemon thread so the rest of the
server (paho, uvicorn, the job runner) does not care where the broker lives. An external
broker (``mqtt://host:port``, mosquitto in production) is used the same way: the server's
MQTT client only ever sees a URL.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from toco_core.errors import ConfigError

log = logging.getLogger("toco.fleet.broker")


class EmbeddedBroker:
    """amqtt listening on ``host:port``; ``url`` is what the MQTT clients connect to."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None
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
                raise ConfigError(f"port {self.port} on {self.host} is already in use; the embedded broker cannot listen",
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
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 0}},
            # anonymous on loopback only; production uses mosquitto with passwords and the ACL
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
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
