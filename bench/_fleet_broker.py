"""The broker of bench/fleet.py: a throw-away mosquitto with a password per simulated device and
server, queue limits sized for the servers' sessions, and its dropped-message counter.

mosquitto's defaults (20 QoS 1 messages in flight, 1,000 queued per client; both global) drop
the device messages queued for a server that falls behind by more than 1,020: a server that
acknowledges after its commit has 20 messages in flight per commit, and a birth burst of 10,000
devices overflowed the queue. The limits below are the ones deploy/mosquitto/toco.conf sets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from contextlib import suppress
from pathlib import Path

import paho.mqtt.client as mqtt

from bench._fleet_sim import bench_password
from tests.support.broker import Broker

# what deploy/mosquitto/toco.conf sets (its comment says why); $SYS every 2 s for the dropped count
BROKER_LIMITS = ["max_inflight_messages 1000", "max_queued_messages 100000", "max_queued_bytes 104857600",
                 "sys_interval 2"]
DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"
MONITOR_USER = "bench-monitor"


def server_user(k: int) -> str:
    """The MQTT user of server (replica) ``k`` (0-based)."""
    return f"toco-server-{k + 1}"


def _password_file(users: list[str]) -> Path:
    """A mosquitto password file with every user's bench password, hashed by ``mosquitto_passwd -U``."""
    where = Path(tempfile.mkdtemp(prefix="toco-bench-pw-"))
    os.chmod(where, 0o755)  # mosquitto drops to its own user before it reads the file
    passwd = where / "passwd"
    passwd.write_text("".join(f"{u}:{bench_password(u)}\n" for u in users))
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True)
    os.chmod(passwd, 0o644)
    return passwd


def start_broker(device_ids: list[str], servers: int) -> Broker:
    """mosquitto with a password for every device, ``servers`` server users and the bench's monitor,
    anonymous clients refused, and BROKER_LIMITS. Raises RuntimeError if it does not start."""
    users = [*device_ids, *(server_user(k) for k in range(servers)), MONITOR_USER]
    passwd = _password_file(users)
    broker = Broker(security=["allow_anonymous false", f"password_file {passwd}", *BROKER_LIMITS])
    try:
        broker.start()
    finally:
        shutil.rmtree(passwd.parent, ignore_errors=True)  # read once at start (again only on SIGHUP)
    return broker


def server_broker_url(broker: Broker, k: int) -> str:
    """The broker URL server ``k`` connects with (its own user and password)."""
    user = server_user(k)
    return f"mqtt://{user}:{bench_password(user)}@127.0.0.1:{broker.port}"


class DropMonitor:
    """A client of the bench's monitor user that follows mosquitto's count of messages it dropped for
    full queues or in-flight windows since it started (``$SYS/broker/publish/messages/dropped``,
    published every sys_interval), from before the traffic to the table."""

    def __init__(self, broker: Broker) -> None:
        """Connect and subscribe (waits up to 10 s for the broker's acceptance)."""
        self.value: int | None = None
        self.refused: str | None = None
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=MONITOR_USER)
        self.c.username_pw_set(MONITOR_USER, bench_password(MONITOR_USER))
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.ready = threading.Event()
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        self.ready.wait(10)

    def _on_connect(self, client, userdata, flags, reason, props) -> None:
        if reason.is_failure:
            self.refused = str(reason)
        else:
            client.subscribe(DROPPED_TOPIC, 1)
        self.ready.set()

    def _on_message(self, client, userdata, msg) -> None:
        with suppress(ValueError):
            self.value = int(msg.payload)

    def dropped(self) -> str:
        """The last count seen, or why there is none (for the table)."""
        if self.value is not None:
            return f"{self.value:,}"
        return f"- (monitor refused: {self.refused})" if self.refused else "- (not published)"

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.c.disconnect()
        self.c.loop_stop()
