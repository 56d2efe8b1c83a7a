"""Request counters and a fixed-bucket latency histogram, for telemetry and ``toco-agent status``."""

from __future__ import annotations

import bisect
import threading
from typing import Any

# Upper bucket edges of the latency histogram, in milliseconds (last bucket is open).
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)



class LatencyStats:
    """Counters and a fixed-bucket latency histogram (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = self.samples = self.errors = self.swaps = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.total_ms = 0.0

    def record(self, ms: float, samples: int) -> None:
        """Count one successful request of ``samples`` samples that took ``ms``."""
        with self._lock:
            self.requests += 1
            self.samples += samples
            self.total_ms += ms
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1

    def quantile_ms(self, q: float) -> float | None:
        """Upper edge of the bucket holding the q-quantile (inf for the open bucket)."""
        with self._lock:
            total = sum(self.buckets)
            if not total:
                return None
            acc = 0
            for i, count in enumerate(self.buckets):
                acc += count
                if acc >= q * total:
                    return float(LATENCY_BUCKETS_MS[i]) if i < len(LATENCY_BUCKETS_MS) else float("inf")
        return None

    def snapshot(self) -> dict[str, Any]:
        """Plain dict for telemetry: counts, histogram (bucket upper edges in ms), p50/p99."""
        p50, p99 = self.quantile_ms(0.5), self.quantile_ms(0.99)
        with self._lock:
            return {"requests": self.requests, "samples": self.samples, "errors": self.errors,
                    "swaps": self.swaps, "mean_ms": self.total_ms / self.requests if self.requests else None,
                    "p50_ms": p50, "p99_ms": p99,
                    "histogram_ms": {"le": [*LATENCY_BUCKETS_MS, "inf"], "counts": list(self.buckets)}}

    def count_error(self) -> None:
        """Count one rejected or failed request."""
        with self._lock:
            self.errors += 1

    def count_swap(self) -> None:
        """Count one model swap."""
        with self._lock:
            self.swaps += 1
