"""The broker of bench/fleet.py: a throw-away mosquitto with a password per simulated device and
server, queue limits sized for the servers' sessions, and its dropped-message counter.

mosquitto's defaults (20 QoS 1 messages in flight, 1,000 queued per client; both global) drop
the device messages queued for a server that falls behind by more than 1,020: a server that
acknowledges after its commit has 20 messages in flight per commit, and a birth burst of 10,000
devices overflowed the queue. The limits below are the ones deploy/mosquitto/toco.conf sets.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
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
    broker.start()
    return broker


def server_broker_url(broker: Broker, k: int) -> str:
    """The broker URL server ``k`` connects with (its own user and password)."""
    user = server_user(k)
    return f"mqtt://{user}:{bench_password(user)}@127.0.0.1:{broker.port}"


def broker_dropped(broker: Broker, wait_s: float = 6.0) -> int | None:
    """mosquitto's count of messages it dropped for full queues or in-flight windows since it started
    (``$SYS/broker/publish/messages/dropped``); None if it did not publish it within ``wait_s``."""
    got: list[int] = []
    done = threading.Event()

    def on_message(client, userdata, msg) -> None:
        got.append(int(msg.payload))
        done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=MONITOR_USER)
    c.username_pw_set(MONITOR_USER, bench_password(MONITOR_USER))
    c.on_connect = lambda client, *a: client.subscribe(DROPPED_TOPIC)
    c.on_message = on_message
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        done.wait(wait_s)
    finally:
        c.disconnect()
        c.loop_stop()
    return got[0] if got else None
