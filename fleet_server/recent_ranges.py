"""Which part ranges this server published lately, so that a duplicate request is not served twice.

A box asks again for ranges it did not get (agent.parts_fetch). When the server is behind, the
box's second request often reaches it after the first answer went out, and serving it again only
lengthens the queue that made the box ask again: 2,000 boxes on one replica asked for 411,975
ranges a second time (docs/topology.md, "The re-request storm"). A range of one device is
therefore *coalesced* (not published again) when this server published it

- within the last ``window_s`` seconds (the first answer may still be on its way), or
- after the box sent this request (the box asked before it could have seen the answer), as long
  as that was within ``horizon_s``: the request's ``sent_at`` is the box's clock, so a box whose
  clock runs behind the server's could have a real re-request (the answer was lost) taken for a
  duplicate; the horizon bounds that to one backoff step of the box, which then asks again.

Entries older than ``horizon_s`` are forgotten, so memory stays at the ranges served in that time.
Not thread-safe: the caller (fleet_server.bundle_publisher) holds its lock.
"""

from __future__ import annotations

from collections import deque

RangeKey = tuple[str, str, str, int]  # (device, bundle, part, offset)


class RecentRanges:
    """The (device, bundle, part, offset) ranges published in the last ``horizon_s`` s, with when."""

    def __init__(self, window_s: float = 5.0, horizon_s: float = 60.0) -> None:
        """``window_s``: a range published this recently is never published again; ``horizon_s`` >= window_s."""
        if not 0 <= window_s <= horizon_s:
            raise ValueError(f"coalescing window {window_s} s must lie within 0..horizon {horizon_s} s")
        self.window_s, self.horizon_s = window_s, horizon_s
        self._sent: dict[RangeKey, tuple[float, float]] = {}  # key -> (monotonic, wall clock) of the publish
        self._order: deque[tuple[float, RangeKey]] = deque()  # (monotonic, key) in publish order, for expiry

    def __len__(self) -> int:
        return len(self._sent)

    def is_duplicate(self, key: RangeKey, asked_at: float, now: float, wall: float) -> bool:
        """True when ``key`` was published within the window, or after ``asked_at`` (the request's ``sent_at``,
        the box's wall clock) and within the horizon. ``now`` is time.monotonic(), ``wall`` time.time()."""
        self._expire(now)
        seen = self._sent.get(key)
        if seen is None:
            return False
        mono, sent_wall = seen
        return now - mono < self.window_s or asked_at < sent_wall

    def published(self, key: RangeKey, now: float, wall: float) -> None:
        """Record that ``key`` went out at ``now`` (monotonic) / ``wall`` (time.time())."""
        self._sent[key] = (now, wall)
        self._order.append((now, key))

    def _expire(self, now: float) -> None:
        order, sent = self._order, self._sent
        while order and now - order[0][0] >= self.horizon_s:
            mono, key = order.popleft()
            if sent.get(key, (None,))[0] == mono:  # not published again since
                del sent[key]
