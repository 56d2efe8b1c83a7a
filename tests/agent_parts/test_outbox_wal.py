"""The outbox's write-ahead log stays small while messages come and go (it counts in the state dir)."""

from __future__ import annotations

from pathlib import Path

from agent.outbox import Outbox


def test_the_outbox_wal_stays_under_a_megabyte_through_thousands_of_messages(tmp_path: Path):
    box = Outbox(tmp_path / "outbox.sqlite3")
    payload = bytes(range(256)) * 8  # a 2 KB status-sized message
    largest = 0
    for _ in range(3000):  # ~6 MB through the outbox: sqlite's default checkpoint let the WAL reach ~4 MB
        box.remove(box.add("toco/v1/f/devices/d/status", "status", payload, 1, False))
        wal = tmp_path / "outbox.sqlite3-wal"
        largest = max(largest, wal.stat().st_size if wal.exists() else 0)
    assert len(box) == 0
    box.close()
    assert 0 < largest < 1_000_000, largest
