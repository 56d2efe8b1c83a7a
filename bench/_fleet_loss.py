"""Counting bench/fleet.py's messages: what the database holds, and backlog told apart from loss.

A message the devices sent that is not in the database when the traffic stops may still be on its
way (queued in the broker for a server session, or in a server's ingest queue). ``drain`` polls the
database until its counts stop growing, so the table says "stored at end of traffic", "drained
after N s" and "lost" (never stored) separately.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# the message kinds the traffic phase sends and the database keeps one row (or device) of each
TRAFFIC_KINDS = ("state", "telemetry", "drift")


def stored_rows(db_url: str) -> dict[str, int]:
    """What the database holds of the devices' messages: devices (births), telemetry points, drift windows."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return {"state": conn.execute(sa.text("SELECT count(*) FROM devices WHERE birth > 0")).scalar_one(),
                    "telemetry": conn.execute(sa.text("SELECT count(*) FROM telemetry")).scalar_one(),
                    "drift": conn.execute(sa.text("SELECT count(*) FROM drift_reports")).scalar_one()}
    finally:
        engine.dispose()


@dataclass
class Drain:
    """The database's counts when the traffic stopped and once they stopped growing, per kind."""

    at_end: dict[str, int]
    final: dict[str, int]
    seconds: float  # from the end of the traffic to the last growth seen (0: nothing arrived later)
    complete: bool  # every sent message was stored (else the counts stood still for quiet_s, or timed out)
    timed_out: bool

    def lost(self, sent: dict[str, int]) -> dict[str, int]:
        """Per kind: sent but never stored (never negative)."""
        return {k: max(0, sent.get(k, 0) - self.final.get(k, 0)) for k in TRAFFIC_KINDS}


def drain(db_url: str, sent: dict[str, int], timeout: float = 120.0, quiet_s: float = 10.0) -> Drain:
    """Poll the database every second after the traffic has stopped until it holds every message in
    ``sent`` (per kind), or its counts have not changed for ``quiet_s`` seconds, or ``timeout`` s passed.

    Returns the counts at the start and at the end, and the seconds until the last change.
    """
    t0 = time.monotonic()
    at_end = last = stored_rows(db_url)
    changed = t0
    while True:
        if all(last.get(k, 0) >= sent.get(k, 0) for k in TRAFFIC_KINDS):
            return Drain(at_end, last, changed - t0, True, False)
        now = time.monotonic()
        if now - changed >= quiet_s or now - t0 >= timeout:
            return Drain(at_end, last, changed - t0, False, now - t0 >= timeout)
        time.sleep(1.0)
        cur = stored_rows(db_url)
        if cur != last:
            last, changed = cur, time.monotonic()
