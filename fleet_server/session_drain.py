"""Draining a dead replica's broker-held MQTT session, so its share of the QoS 1 messages is not stranded.

Each replica resumes an MQTT 5 session (``mqtt_session_expiry_s``) under a client id stable across
restarts, and is a member of the shared subscriptions ``$share/toco-fleet/...``. mosquitto (2.0.11
measured) keeps handing a member whose connection is gone its share of the QoS 1 messages: they wait
in that session until it expires, and are then dropped. A replica SIGKILLed and not restarted thus
strands device statuses and drift reports (a 2,000-device deployment did not complete, docs/topology.md).

The fix: every replica registers its session in the ``replicas`` table (client id, MQTT user,
expiry). The leader checks, every ``check_s``, whether each other registered replica is alive: a
live one holds its ``mqtt-identity`` advisory lock (fleet_server.replicas) on its lease session, which
PostgreSQL frees the moment the process dies. A replica whose lock has been free for ``grace_s`` is
dead: the leader takes that lock (so the replica cannot come back, nor anyone else drain, meanwhile: a
restart waits for it, fleet_server.replicas),
connects under its client id with clean_start=False (session takeover), unsubscribes the shared
filters at once (no new messages are routed to it), hands every message the broker delivers to its own
ingest (the same handler, acknowledged after the commit), and once no message came for ``quiet_s``
and every one is acknowledged, disconnects with session expiry 0: the broker drops the session and
routes everything later to live members. The row is deleted and the lock released; the replica, if it
ever comes back under the same client id, simply starts a new session.

Under mosquitto's ``use_username_as_clientid`` a session belongs to a user, so the drain logs in as
the dead replica's MQTT user: its password is ``{mqtt_peer_password_dir}/{user}.password``. Without
that directory a replica with an MQTT user is not drained (logged): logging in as one's own user
would take over one's own session instead.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import create_engine, delete, select, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from fleet_server.db import Database, ReplicaRow
from fleet_server.mqtt_client import Ack, DeviceHandler, FleetMqtt, ingest_subscriptions
from fleet_server.replicas import drain_application_name, lock_key

log = logging.getLogger("toco.fleet.drain")


def register_replica(db: Database, *, client_id: str, replica_id: str, identity: str, mqtt_user: str | None,
                     session_expiry_s: int) -> None:
    """Record (or refresh) this replica's broker session in the ``replicas`` table.

    Takes the database and the session's facts. Returns None. Raises what the database raises.
    """
    with db.session(write=True) as s:
        s.execute(delete(ReplicaRow).where(ReplicaRow.client_id == client_id))
        s.add(ReplicaRow(client_id=client_id, replica_id=replica_id, identity=identity, mqtt_user=mqtt_user,
                         session_expiry_s=session_expiry_s, started_at=time.time()))


class SessionDrain(FleetMqtt):
    """One connection under a dead replica's client id: takes its session over, unsubscribes, and receives
    what was queued in it until quiet (``drain()``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.received = 0
        self.session_present: bool | None = None
        self._pending = 0  # QoS 1 messages handed to ingest and not yet acknowledged
        self._last_message = self._last_progress = time.monotonic()
        self._count_lock = threading.Lock()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the session drain", extra={"fields": {"reason": str(reason_code)}})
            return
        with self._ack_lock:
            self._connection += 1
        self.session_present = bool(flags.session_present)
        # the session's own subscriptions stay the broker's routing table: leave every shared group at once
        topics = [topic for topic, _ in ingest_subscriptions(self.topics, self.shared_group)]
        # and the relay topic, subscribed plainly: every replica's events would keep the drain from going quiet
        client.unsubscribe([*topics, self.topics.server_events()])
        with self._count_lock:
            self._last_message = self._last_progress = time.monotonic()
        self.connected.set()

    def _acker(self, msg: mqtt.MQTTMessage) -> Ack:
        base = super()._acker(msg)
        with self._count_lock:
            self.received += 1
            self._last_message = self._last_progress = time.monotonic()
            if msg.qos == 0:
                return base
            self._pending += 1

        def ack() -> None:
            base()
            with self._count_lock:
                self._pending -= 1
                self._last_progress = time.monotonic()
        return ack

    def state(self) -> tuple[float, int, float]:
        """(seconds since the last message, messages not acknowledged yet, seconds since the last message
        or acknowledgement)."""
        now = time.monotonic()
        with self._count_lock:
            return now - self._last_message, self._pending, now - self._last_progress

    def drain(self, quiet_s: float, stall_s: float, stop: threading.Event | None = None) -> bool:
        """Connect, take what the session holds until ``quiet_s`` passes with no new message and every one
        is acknowledged (stored by ingest, which may be behind under load: waited for as long as it makes
        progress), then end the session (expiry 0). Returns True when drained; False when nothing moved
        for ``stall_s`` or ``stop`` was set (the session is then left to the broker, expiry unchanged, for
        a later try). Raises TimeoutError if the broker is unreachable."""
        try:
            self.start()
            drained = False
            while not (stop is not None and stop.is_set()):
                quiet, pending, still = self.state()
                if quiet >= quiet_s and pending == 0:
                    drained = True
                    break
                if still > stall_s:
                    break
                time.sleep(0.1)
            props = Properties(PacketTypes.DISCONNECT)
            if drained:  # the broker drops the session now, with its shared memberships
                props.SessionExpiryInterval = 0
            self.client.disconnect(properties=props)
            deadline = time.monotonic() + 5
            while self.connected.is_set() and time.monotonic() < deadline:  # the DISCONNECT is out
                time.sleep(0.05)
            return drained
        finally:
            self.client.loop_stop()


class DeadSessionWatch:
    """The leader's watch over the other replicas' sessions: drains each one whose replica died."""

    def __init__(self, db: Database, url: URL, *, replica_id: str, own_client_id: str, broker_url: str, topics,
                 shared_group: str,
                 on_device: DeviceHandler, on_get: Callable[[str, bytes], None],
                 is_leader: Callable[[], bool], password_dir: Path | None, ca_file: str | None,
                 check_s: float = 2.0, grace_s: float = 5.0, quiet_s: float = 2.0, stall_s: float = 300.0) -> None:
        """``replica_id``: this replica's, named in the watch's database session (a replica restarted during a
        drain sees who drains it); ``own_client_id``: never drained; ``on_device``/``on_get``: this replica's
        own handlers (ingest may be minutes behind under load: ``stall_s`` without a message or an
        acknowledgement ends a drain);
        ``is_leader()``: only the leader drains; ``password_dir``: the replicas' ``{user}.password`` files."""
        self.db, self.own_client_id, self.broker_url, self.topics = db, own_client_id, broker_url, topics
        self.shared_group, self.on_device, self.on_get, self.is_leader = shared_group, on_device, on_get, is_leader
        self.password_dir, self.ca_file = password_dir, ca_file
        self.check_s, self.grace_s, self.quiet_s, self.stall_s = check_s, grace_s, quiet_s, stall_s
        # a session of its own for the session-level locks (a pooled one would keep them on another's loan),
        # named so that a replica waiting for its identity lock can tell a drain from a live twin
        self._engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                                     connect_args={"application_name": drain_application_name(replica_id)})
        self._dead_since: dict[str, float] = {}
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.drained: list[dict] = []  # what each drain did, for /api/health

    def start(self) -> None:
        """Start the watch thread."""
        self._thread = threading.Thread(target=self._loop, name="session-drain", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (a drain under way is cut short: its session is left for a later try). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            # a drain notices the stop within 0.1 s, then disconnects (a frozen broker: up to 5 s; the
            # thread is a daemon, so the process need not wait for it)
            self._thread.join(3)
        self._engine.dispose()

    def _loop(self) -> None:
        while not self._stop.wait(self.check_s):
            if not self.is_leader():
                self._dead_since.clear()
                continue
            try:
                self.check()
            except Exception:  # the watch must go on: the next check tries again
                log.exception("checking the other replicas' sessions failed")

    def check(self) -> None:
        """One pass: note which registered replicas are dead, drain those dead beyond the grace period."""
        with self.db.session() as s:
            rows = [(r.client_id, r.replica_id, r.identity, r.mqtt_user)
                    for r in s.scalars(select(ReplicaRow).where(ReplicaRow.client_id != self.own_client_id))]
        with self._engine.connect() as conn:
            for client_id, replica_id, identity, user in rows:
                if self._stop.is_set():
                    return
                key = lock_key(f"mqtt-identity:{identity}")
                if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                    self._dead_since.pop(client_id, None)  # alive: its lease session holds the lock
                    continue
                try:
                    first = self._dead_since.setdefault(client_id, time.monotonic())
                    if time.monotonic() - first >= self.grace_s:
                        self._drain(client_id, replica_id, user)
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})

    def _password(self, user: str) -> str | None:
        if self.password_dir is None:
            return None
        with contextlib.suppress(OSError, IndexError):
            return (self.password_dir / f"{user}.password").read_text().splitlines()[0]
        return None

    def _drain(self, client_id: str, replica_id: str, user: str | None) -> None:
        password = None
        if user is not None:
            password = self._password(user)
            if password is None:
                if client_id not in self._warned:
                    self._warned.add(client_id)
                    log.warning("a dead replica's MQTT session cannot be drained without its user's password "
                                "(mqtt_peer_password_dir/{user}.password): its share of the messages waits there",
                                extra={"fields": {"replica": replica_id, "client_id": client_id, "user": user}})
                return
        idle = time.monotonic() - self._dead_since[client_id]
        log.warning("draining the MQTT session of a dead replica", extra={"fields": {
            "replica": replica_id, "client_id": client_id, "dead_for_s": round(idle, 1)}})
        t0 = time.monotonic()
        # on_relay: the events relayed to the dead replica were for its browsers, which are gone
        drain = SessionDrain(self.broker_url, self.topics, on_device=self.on_device, on_get=self.on_get,
                             client_id=client_id, username=user, password=password, ca_file=self.ca_file,
                             shared_group=self.shared_group, session_expiry_s=60, on_relay=_drop_relayed)
        done = drain.drain(self.quiet_s, self.stall_s, self._stop)
        took = round(time.monotonic() - t0, 1)
        quiet, pending, _ = drain.state()
        fields = {"replica": replica_id, "client_id": client_id, "messages": drain.received,
                  "session_present": drain.session_present, "seconds": took, "unacknowledged": pending,
                  "last_message_s_ago": round(quiet, 1)}
        if not done:
            log.error("the dead replica's session drain stalled or was stopped; it is tried again",
                      extra={"fields": fields})
            return
        with self.db.session(write=True) as s:
            s.execute(delete(ReplicaRow).where(ReplicaRow.client_id == client_id))
        self._dead_since.pop(client_id, None)
        self.drained.append(fields)
        log.warning("drained the dead replica's MQTT session", extra={"fields": fields})


def _drop_relayed(payload: bytes) -> None:
    """A drained session's relayed events: their browsers died with the replica, nobody is left to show them."""
