"""Who may run, and who runs the singleton duties: one serve per SQLite data dir, a leader among replicas.

Several ``toco-fleet serve --replicas`` processes share one PostgreSQL database and one external
broker. Ingest is spread over them by the broker (shared subscriptions, fleet_server.mqtt_client);
the duties that must run once (deployment ticks and silent-device timeouts, the drift policy's
tick, pushing trusted keys, retention housekeeping, analysis job dispatch) run on the leader only.

Leadership is a PostgreSQL session advisory lock (``pg_try_advisory_lock``) taken on a dedicated
connection held for the process lifetime. PostgreSQL releases it the moment that session ends, so a
killed leader (its socket closed by the kernel) frees it at once; a vanished host frees it when
TCP keepalives give up (about 15 s, set below). Every other replica tries to take it every
``lease_check_s`` seconds, so one of them takes over within a few seconds. A lease whose session
breaks is never "re-won" silently: the replica reports it lost (``toco-fleet serve`` then exits
and its supervisor restarts it), so two leaders never overlap. The same session holds a second
lock naming the replica's MQTT identity, so two replicas configured with the same MQTT user (which
the broker would make kick each other off) refuse to run side by side. The leader's session drain
(fleet_server.session_drain) holds a dead replica's identity lock while it drains that replica's MQTT
session: a replica restarted meanwhile waits for it (``identity_wait_s``) instead of refusing.

SQLite allows one writer process, so a serve on SQLite takes an exclusive file lock in its data dir
and is always the leader; a second serve on the same data dir refuses with one clear line.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.pool import NullPool

from fleet_server.config import FleetSettings
from toco_core.errors import ConfigError

log = logging.getLogger("toco.fleet.replicas")
LEASE_FILE = "serve.lock"
# the application_name of the leader's session-drain connection (pg_stat_activity): a replica whose identity
# lock is held by such a session knows its previous MQTT session is being drained, not that it runs twice
DRAIN_APPLICATION = "toco-fleet-drain "


class ReplicaError(ConfigError):
    """Raised when this serve may not run next to the others: a second serve on one SQLite data dir,
    replicas asked for on SQLite or on the embedded broker, or an MQTT identity another replica holds."""


def check_replica_setup(settings: FleetSettings) -> None:
    """Refuse replicas where they cannot work, before anything is started.

    Takes the settings. Returns None. Raises ReplicaError when ``replicas`` is set with a SQLite
    database (one writer process) or the embedded broker (in-process, no shared subscriptions).
    """
    if not settings.replicas:
        return
    if settings.database_url.startswith("sqlite"):
        raise ReplicaError("replicas need a shared PostgreSQL database, not SQLite",
                           "give every replica the same --db-url postgresql+psycopg://...")
    if settings.broker == "embedded":
        raise ReplicaError("replicas need one external broker, not the embedded one",
                           "run mosquitto and give every replica --broker mqtt://host:1883")


def lock_key(name: str) -> int:
    """The signed 64-bit advisory lock key of ``name`` (stable across processes and releases)."""
    return int.from_bytes(hashlib.sha256(f"toco-fleet:{name}".encode()).digest()[:8], "big", signed=True)


def drain_application_name(replica_id: str) -> str:
    """The PostgreSQL application_name of replica ``replica_id``'s session-drain connection (63 bytes at most)."""
    return f"{DRAIN_APPLICATION}{replica_id}"[:63]


DRIFT_POLICY = "drift-policy"  # the transaction lock of everything that reads or writes re-analyses


def transaction_lock(s, name: str) -> None:
    """Hold the lock ``name`` until the session's transaction ends (``pg_advisory_xact_lock``; a no-op on
    SQLite, where one process writes). Serialises work that replicas may do at once on the same rows.

    Takes the session and the lock's name. Returns None. Raises what the database raises.
    """
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key(name)})


class DataDirLock:
    """One serve per SQLite data dir: an exclusive ``flock`` on ``{data_dir}/serve.lock``, always the leader."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LEASE_FILE
        self._fd: int | None = None
        self.is_leader = False

    def acquire(self, solo: bool = True) -> None:
        """Take the lock (the kernel drops it when the process ends, however it ends).

        Raises ReplicaError naming the holder's pid when another process holds it.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ReplicaError(f"another toco-fleet serve (pid {holder}) already runs on {self.path.parent} "
                               "with its SQLite database", "stop it first; several replicas need PostgreSQL and "
                               "an external broker (--replicas)") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd, self.is_leader = fd, True

    def start(self, on_gained: Callable[[], None]) -> None:
        """The holder of the data dir is the leader from the start: ``on_gained()`` runs now."""
        on_gained()

    def stop(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self.is_leader = None, False


class LeaderLease:
    """The singleton duties' lease on PostgreSQL: a session advisory lock, retried every ``check_s``."""

    def __init__(self, url: URL, *, replica_id: str, identity: str, check_s: float,
                 on_lost: Callable[[str], None], identity_wait_s: float = 0.0) -> None:
        """``identity``: the MQTT identity this replica holds (its user, else its client id);
        ``on_lost(reason)`` runs once, on the lease thread, when the lease session breaks;
        ``identity_wait_s``: how long ``acquire`` waits while the leader drains this identity's old session."""
        self.replica_id, self.identity, self.check_s, self.on_lost = replica_id, identity, check_s, on_lost
        self.identity_wait_s = identity_wait_s
        # a dedicated, unpooled, autocommit session: an idle transaction would pin old row versions for
        # the whole process lifetime; keepalives make a vanished host's locks go within ~15 s
        self._engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT", connect_args={
            "application_name": f"toco-fleet {replica_id}"[:63], "keepalives": 1, "keepalives_idle": 5,
            "keepalives_interval": 2, "keepalives_count": 3})
        self._conn: Connection | None = None
        self._on_gained: Callable[[], None] = lambda: None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._leader = threading.Event()

    @property
    def is_leader(self) -> bool:
        """Whether this replica holds the lease now."""
        return self._leader.is_set()

    def acquire(self, solo: bool = False) -> None:
        """Open the lease session and claim this replica's MQTT identity; tries for the lease once.

        ``solo``: this serve was not started as a replica, so it must be the only one on the database.
        While the leader drains this identity's previous MQTT session (a restart of a replica it found dead),
        waits for the drain with backoff, up to ``identity_wait_s``, logging one line when it starts waiting.
        Raises ReplicaError when another live replica holds the same MQTT identity (at once), when the drain
        still holds it after ``identity_wait_s``, or (``solo``) when another serve already leads on this database.
        """
        self._conn = self._engine.connect()
        try:
            self._claim_identity()
        except BaseException:  # a refusal, or SIGTERM while waiting: the session (and any lock) goes now
            self.stop()
            raise
        if self._try("leader"):
            self._leader.set()
        elif solo:
            self.stop()
            raise ReplicaError("another toco-fleet serve already runs on this database",
                               "stop it, or start every serve on it with --replicas and an external broker")

    def _claim_identity(self) -> None:
        name = f"mqtt-identity:{self.identity}"
        deadline = time.monotonic() + self.identity_wait_s
        logged = False
        delay = 0.2
        while not self._try(name):
            holder = self._holder(name)
            drainer = holder[len(DRAIN_APPLICATION):] if holder and holder.startswith(DRAIN_APPLICATION) else None
            if holder is not None and drainer is None:  # a live replica's lease session: a real duplicate
                raise ReplicaError(f"another replica already connects to the broker as {self.identity!r}",
                                   "give each replica its own MQTT user (--mqtt-username, a user of the broker's "
                                   "password file and ACL)")
            now = time.monotonic()
            if drainer is not None and not logged:
                logged = True
                log.warning("replica %s: its previous session is being drained by replica %s; waiting up to %.0f s",
                            self.replica_id, drainer, self.identity_wait_s,
                            extra={"fields": {"identity": self.identity, "drained_by": drainer}})
            if now >= deadline:
                raise ReplicaError(f"replica {self.replica_id}: its previous session was still being drained by "
                                   f"replica {drainer or 'the leader'} after {self.identity_wait_s:.0f} s",
                                   "start it again once the leader's log says the session was drained, or raise "
                                   "identity_wait_s (TOCO_FLEET_IDENTITY_WAIT_S)")
            # holder None: the lock was released between the two queries; try again soon
            time.sleep(max(0.0, min(delay, deadline - now)))
            delay = min(delay * 2, 5.0)

    def _holder(self, name: str) -> str | None:
        """The application_name of the session holding the advisory lock ``name`` on this database, None when
        no session holds it (any more)."""
        assert self._conn is not None, "the lease's session is open"
        key = lock_key(name)
        # a bigint advisory lock shows in pg_locks as classid = its high 32 bits, objid = its low ones, objsubid 1
        row = self._conn.execute(text(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.classid::bigint = :hi "
            "AND l.objid::bigint = :lo "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
            {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}).first()
        return None if row is None else str(row[0] or "")

    def _try(self, name: str) -> bool:
        assert self._conn is not None, "the lease's session is open"
        return bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_key(name)}).scalar())

    def start(self, on_gained: Callable[[], None]) -> None:
        """Start the lease thread; ``on_gained()`` runs (once) when this replica becomes the leader."""
        self._on_gained = on_gained
        if self.is_leader:
            self._gained()
        self._thread = threading.Thread(target=self._loop, name="leader-lease", daemon=True)
        self._thread.start()

    def _gained(self) -> None:
        log.info("this replica leads the singleton duties", extra={"fields": {"replica": self.replica_id}})
        try:
            self._on_gained()
        except Exception:  # the lease stays taken: the duties of the tick loop still run here
            log.exception("starting the leader's duties failed")

    def _loop(self) -> None:
        while not self._stop.wait(self.check_s):
            try:
                if self.is_leader:
                    conn = self._conn
                    if conn is None:  # stop() ended the session
                        return
                    conn.execute(text("SELECT 1"))  # the session, and so the lock, is still there
                elif self._try("leader"):
                    self._leader.set()
                    self._gained()
            except Exception as exc:  # the session broke: its locks are gone, maybe already someone else's
                if self._stop.is_set():
                    return
                self._leader.clear()
                log.error("lost the database session holding the replica lease",
                          extra={"fields": {"replica": self.replica_id, "error": str(exc)[:200]}})
                self.on_lost(f"the lease session broke: {exc}")
                return

    def stop(self) -> None:
        """Stop checking and end the session (which releases both locks at once). Idempotent."""
        self._stop.set()
        self._leader.clear()
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a broken session is released by PostgreSQL anyway
                self._conn.close()
            self._conn = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._engine.dispose()


def make_lease(settings: FleetSettings, url: URL, on_lost: Callable[[str], None]) -> DataDirLock | LeaderLease:
    """The lease this serve needs: a DataDirLock on SQLite, a LeaderLease on PostgreSQL.

    Takes the settings, the database URL in effect and ``on_lost`` (see LeaderLease). Returns the
    lease, not yet acquired. Raises ReplicaError for replicas on a database that has no advisory locks.
    """
    if url.get_backend_name() == "sqlite":
        return DataDirLock(settings.data_dir)
    if url.get_backend_name() != "postgresql":
        if settings.replicas:
            raise ReplicaError(f"replicas need PostgreSQL, not {url.get_backend_name()}",
                               "give every replica the same --db-url postgresql+psycopg://...")
        return DataDirLock(settings.data_dir)
    identity = settings.mqtt_username or f"toco-fleet-{settings.fleet}-{settings.replica_id}"
    return LeaderLease(url, replica_id=settings.replica_id, identity=identity, check_s=settings.lease_check_s,
                       on_lost=on_lost, identity_wait_s=settings.identity_wait_s)
