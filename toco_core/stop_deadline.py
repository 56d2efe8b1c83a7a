"""A last resort for a process's stop: past a deadline, say why and end the process.

A stop is a chain of parts that each bound their own wait; a part that ignores its bound (a library's
non-daemon thread, a wait that never returns) must still not hang a supervisor, a user's terminal or CI.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


def exit_if_stuck(deadline_s: float, report: Callable[[], None]) -> threading.Timer:
    """Start a daemon timer that, if the process still runs ``deadline_s`` seconds from now, calls ``report()``
    (say what was stuck) and ends the process with status 1 without further clean-up (``os._exit``).

    Returns the started timer: ``cancel()`` it once the stop finished in time. Raises nothing.
    """
    def stuck() -> None:
        report()
        os._exit(1)

    timer = threading.Timer(deadline_s, stuck)
    timer.daemon = True
    timer.start()
    return timer
