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
the broker would make kick each other off) refuse to run side by side.

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
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.pool import NullPool

from fleet_server.config import FleetSettings
from toco_core.errors import ConfigError

log = logging.getLogger("toco.fleet.replicas")
LEASE_FILE = "serve.lock"


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
                 on_lost: Callable[[str], None]) -> None:
        """``identity``: the MQTT identity this replica holds (its user, else its client id);
        ``on_lost(reason)`` runs once, on the lease thread, when the lease session breaks."""
        self.replica_id, self.identity, self.check_s, self.on_lost = replica_id, identity, check_s, on_lost
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
        Raises ReplicaError when another live replica holds the same MQTT identity, or (``solo``) when
        another serve already leads on this database.
        """
        self._conn = self._engine.connect()
        if not self._try(f"mqtt-identity:{self.identity}"):
            self.stop()
            raise ReplicaError(f"another replica already connects to the broker as {self.identity!r}",
                               "give each replica its own MQTT user (--mqtt-username, a user of the broker's "
                               "password file and ACL)")
        if self._try("leader"):
            self._leader.set()
        elif solo:
            self.stop()
            raise ReplicaError("another toco-fleet serve already runs on this database",
                               "stop it, or start every serve on it with --replicas and an external broker")

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
                       on_lost=on_lost)
