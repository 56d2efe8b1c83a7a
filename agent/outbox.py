"""The agent's persisted outbox: QoS-1 messages kept on disk until the broker acknowledged them.

Status, drift and sample messages must survive a broker outage and an agent restart
(kill -9 included): sqlite in WAL mode, one row per message, written before the publish.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("toco.agent.mqtt")


class Outbox:
    """QoS-1 messages not yet acknowledged by the broker, in ``outbox.sqlite3`` (oldest dropped past max_rows)."""

    def __init__(self, path: Path, max_rows: int = 10_000) -> None:
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
                         " kind TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL)")

    def add(self, topic: str, kind: str, payload: bytes, qos: int, retain: bool) -> int:
        """Store one message; returns its row id."""
        with self._lock:
            cur = self._db.execute("INSERT INTO outbox (topic, kind, payload, qos, retain) VALUES (?, ?, ?, ?, ?)",
                                   (topic, kind, payload, qos, int(retain)))
            (n,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            if n > self.max_rows:
                log.warning("outbox full, dropping oldest", extra={"fields": {"dropped": n - self.max_rows}})
                self._db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)",
                                 (n - self.max_rows,))
            assert cur.lastrowid is not None, "an INSERT sets lastrowid"
            return int(cur.lastrowid)

    def pending(self) -> list[tuple[int, str, str, bytes, int, bool]]:
        """All stored rows, oldest first: (id, topic, kind, payload, qos, retain)."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, kind, payload, qos, retain FROM outbox ORDER BY id").fetchall()
        return [(i, t, k, bytes(p), q, bool(r)) for i, t, k, p, q, r in rows]

    def holds(self, row_id: int) -> bool:
        """Whether row ``row_id`` is still stored (not yet acknowledged, not dropped)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM outbox WHERE id = ?", (row_id,)).fetchone() is not None

    def remove(self, row_id: int) -> None:
        """Forget an acknowledged message."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
