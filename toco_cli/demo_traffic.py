"""Inference traffic for the demo: held-out samples (digits, sensor rows), one at a time, into each agent's HTTP API.

A line sends parts at a steady pace; ``shift`` swaps the samples for distribution-shifted ones
(rotated, inverted, noisy digits; faulty sensor readings) the way a knocked camera or a drifting
sensor would, without stopping the line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np

from toco_core.demo.data import shifted_digits

log = logging.getLogger("toco.demo.traffic")


class Traffic:
    """A background thread posting samples to one agent at ``rate`` per second."""

    def __init__(self, agent, digits: np.ndarray, rate: float = 40.0,
                 shifter: Callable[[np.ndarray, str], np.ndarray] = shifted_digits) -> None:
        """``agent`` is a demo AgentProcess; ``digits`` the held-out samples [N, ...] (float32 [N, 1, 28, 28]
        digits by default); ``shifter(samples, kind)`` makes the shifted copies ``shift`` sends."""
        self.agent = agent
        self.clean = digits
        self.source = digits
        self.shifter = shifter
        self.shift_kind: str | None = None
        self.period = 1.0 / rate
        self.sent = 0
        self.errors = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"traffic-{agent.device.device_id}", daemon=True)

    def start(self) -> Traffic:
        """Start sending. Returns self."""
        self._thread.start()
        return self

    def shift(self, kind: str) -> None:
        """From now on send ``kind`` copies of the samples (digits: rotate | invert | noise | dim).

        Raises what the shifter raises for an unknown kind (shifted_digits: ValueError).
        """
        self.source = self.shifter(self.clean, kind)
        self.shift_kind = kind

    def _run(self) -> None:
        i = 0
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                x = self.source[i % len(self.source)][None]
                i += 1
                try:
                    self.agent.infer(client, x)
                    self.sent += 1
                except httpx.HTTPError as exc:  # the agent may be swapping models or restarting: keep going
                    self.errors += 1
                    self.last_error = str(exc)[:200]
                    log.debug("inference failed", extra={"fields": {"device": self.agent.device.device_id,
                                                                    "error": self.last_error}})
                    self._stop.wait(0.5)
                self._stop.wait(max(0.0, self.period - (time.monotonic() - start)))

    def stop(self) -> None:
        """Stop sending and join the thread."""
        self._stop.set()
        self._thread.join(5)
