"""A simulated device's parts fetch: agent.parts_fetch's request rules, on the simulator's event loop.

It mirrors the agent's PartsFetcher rule for rule, so bench/fleet.py's devices load the server as
agents would: ranges of at most MAX_RANGE_LENGTH, WINDOW (32) in flight, refilled whenever a frame
arrives once half a window is free, at most MAX_RANGES_PER_REQUEST per request; the ranges in flight
asked for again only after no frame at all arrived for PART_REQUEST_TIMEOUT_S, each further
re-request without a frame backing off (toco_core.rerequest, the same Backoff and QuietTimer the agent
uses: 10 s, 20, 40, 60, 60, ... plus jitter); MAX_STALLS re-requests in a row without a frame end the
fetch as ``transfer_stalled``; a reconnect asks again at once for what was in flight. It does not
write, verify or resume parts (nothing is stored), and asks for every part but the optional fp32 base.
"""

from __future__ import annotations

from collections.abc import Callable

from toco_core.messages import MAX_RANGE_LENGTH, MAX_RANGES_PER_REQUEST, BundleManifest, PartRange
from toco_core.rerequest import Backoff, QuietTimer

# agent.parts_fetch.PartsFetcher's defaults
WINDOW = 32
PART_REQUEST_TIMEOUT_S = 10.0
BACKOFF_CAP_S = 60.0
MAX_STALLS = 6
# (ranges) -> None: publishes one PartRequest (the caller's MQTT client)
Ask = Callable[[list[PartRange]], None]


class SimFetch:
    """One device's fetch of a bundle's parts (all but ``base``). ``frame`` for each part frame, ``tick`` about
    once a second (the agent's watch period); ``done`` once every range is here, ``stalled`` once given up."""

    def __init__(self, manifest: BundleManifest, ask: Ask, now: float) -> None:
        self.ranges = [PartRange(part=f.name, offset=o, length=min(MAX_RANGE_LENGTH, f.size - o))
                       for f in manifest.files if f.name != "base" for o in range(0, f.size, MAX_RANGE_LENGTH)]
        self.want = sum(r.length for r in self.ranges)
        self.ask = ask
        self.here: set[tuple[str, int]] = set()
        self.inflight: set[tuple[str, int]] = set()
        self.received = 0
        self.rerequested = 0  # ranges asked for again after a silence
        self.stalled = False
        self.timer = QuietTimer(Backoff(PART_REQUEST_TIMEOUT_S, BACKOFF_CAP_S))
        self.timer.progress(now)

    @property
    def done(self) -> bool:
        """Every range arrived."""
        return self.received >= self.want

    def frame(self, key: tuple[str, int], size: int, now: float) -> None:
        """A part frame for (part, offset) of ``size`` bytes arrived: any frame restarts the silence."""
        self.timer.progress(now)
        self.inflight.discard(key)
        if key not in self.here:
            self.here.add(key)
            self.received += size
        self.pump()

    def reconnected(self, now: float) -> None:
        """A new connection: what was in flight is asked for again at once (the agent's _on_reconnect)."""
        self.inflight.clear()
        self.timer.progress(now)
        self.pump()

    def tick(self, now: float) -> None:
        """Ask again for what is in flight once the transfer was silent for the backoff's delay; give up after
        MAX_STALLS such re-requests in a row."""
        if self.done or self.stalled:
            return
        if self.inflight and self.timer.due(now):
            if self.timer.attempts >= MAX_STALLS:
                self.stalled = True
                return
            self.rerequested += len(self.inflight)
            self.inflight.clear()
            self.timer.asked_again(now)
        self.pump()

    def pump(self) -> None:
        """Ask for missing ranges until WINDOW are in flight, in batches of at least half a window."""
        if self.done or self.stalled:
            return
        room = WINDOW - len(self.inflight)
        if room < WINDOW // 2:
            return
        want = [r for r in self.ranges if (r.part, r.offset) not in self.here
                and (r.part, r.offset) not in self.inflight][:min(room, MAX_RANGES_PER_REQUEST)]
        if want:
            self.inflight.update((r.part, r.offset) for r in want)
            self.ask(want)
