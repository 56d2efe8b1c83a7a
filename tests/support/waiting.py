"""Polling a condition with a deadline (the tests' and benches' one wait loop)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(cond: Callable[[], object], timeout: float = 10.0, step: float = 0.02) -> bool:
    """Poll ``cond`` every ``step`` s until it is true or ``timeout`` s passed.

    Returns the last value of ``cond`` (checked once more at the deadline, so a condition that
    became true during the final sleep still counts). Raises whatever ``cond`` raises.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())
