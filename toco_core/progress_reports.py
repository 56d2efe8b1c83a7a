"""When a box fetching a bundle's parts tells the fleet how far it is.

Often enough to show progress on the dashboard and to keep a deployment's silence timeout
(``deploy_timeout_s``, 120 s by default) from failing a box that is still fetching; rarely enough
that 2,000 boxes fetching at once do not bury one replica's status ingest. Every tenth of the bytes
made ~13 statuses per box a deployment, and at 2,000 boxes on one PostgreSQL-backed replica those
statuses, not the bytes, kept the deployment from completing (docs/topology.md).
"""

from __future__ import annotations

from dataclasses import dataclass

STEP = 0.25  # a report per quarter of the bytes at most ...
MIN_GAP_S = 10.0  # ... and not within 10 s of the previous one
KEEPALIVE_S = 30.0  # a slow fetch that moved at all says so every 30 s, well inside the 120 s timeout


@dataclass
class ProgressReports:
    """The progress reports of one fetch: ``due`` says when the next one goes out."""

    last_t: float  # monotonic s of the last report; at first the fetch's own `downloading` (progress 0)
    last_share: float = 0.0

    def due(self, share: float, now: float) -> bool:
        """Whether a progress status for ``share`` (received / wanted bytes, 0..1) at ``now`` (monotonic s)
        should go out; if so it is recorded as sent.

        Due when the share grew by STEP (0.25) since the last report and MIN_GAP_S (10 s) passed, or when it
        grew at all and KEEPALIVE_S (30 s) passed. Never at share >= 1: the next phase's status says that.
        """
        if share >= 1 or share <= self.last_share:
            return False
        gap = now - self.last_t
        if (share - self.last_share >= STEP and gap >= MIN_GAP_S) or gap >= KEEPALIVE_S:
            self.last_share, self.last_t = share, now
            return True
        return False
