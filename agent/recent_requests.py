"""Ids for inference requests, and the batch sizes of the most recent ones (for feedback labels).

An id is this engine's random token and a counter (``3f9a0c2e-1b7``): unique across restarts,
and the batch sizes of the last N requests fit a ring of N integers (40 KB for 10,000). A dict
keyed by uuid hex strings held 1.5 MB once full: a long-running agent's RSS crept up by that.
"""

from __future__ import annotations

import os
import threading
from array import array


class RecentRequests:
    """Hands out request ids and remembers the batch size of the last ``remember`` of them."""

    def __init__(self, remember: int = 10_000) -> None:
        if remember < 1:
            raise ValueError(f"remember must be >= 1, got {remember}")
        self.remember = remember
        self._token = os.urandom(4).hex()
        self._sizes = array("I", bytes(4 * remember))
        self._next = 0
        self._lock = threading.Lock()

    def add(self, batch: int) -> str:
        """Record a request of ``batch`` samples; returns its new id."""
        with self._lock:
            n = self._next
            self._next += 1
            self._sizes[n % self.remember] = batch
        return f"{self._token}-{n:x}"

    def batch_of(self, request_id: str) -> int | None:
        """The batch size of ``request_id``, or None when it is not one of the last ``remember`` ids."""
        token, sep, counter = request_id.partition("-")
        if not sep or token != self._token:
            return None
        try:
            n = int(counter, 16)
        except ValueError:
            return None
        if counter != f"{n:x}":  # int() also takes "+1f", " 1f" and "1_f": not ids this handed out
            return None
        with self._lock:
            if not max(0, self._next - self.remember) <= n < self._next:
                return None
            return self._sizes[n % self.remember]
