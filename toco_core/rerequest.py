"""When a downloader asks again for what it asked for and did not get: after a quiet spell, backing off.

A box asks for chunks or part ranges and the server answers them at QoS 0, so an answer can be lost
and the box must ask again. Asking again after a fixed time per request turned a busy server into a
storm: with 2,000 boxes fetching at once the server's queue of requests is longer than the timeout,
every box asks again for everything still missing while the first answers are still on their way,
and the server serves every duplicate (docs/topology.md, "The re-request storm").

The rule here: a transfer asks again only after it has made *no progress* for the delay (any
frame that arrives restarts the clock), and each further re-request of the same ranges without
progress in between waits twice as long, capped, with random jitter so that boxes that went
quiet together do not all ask again in the same second: 10 s, then 20, 40, 60, 60, ... (each up
to ``jitter`` later). Progress resets the backoff. The clock is passed in (``now``), so the rule is
a pure state machine that the agent and the bench's device simulator share.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from toco_core.errors import TransferError


@dataclass(frozen=True)
class Backoff:
    """The delays of a transfer's re-requests: ``first`` s of silence before the first one, doubled for each
    further one without progress, at most ``cap`` s, each stretched by up to ``jitter`` of itself."""

    first: float = 10.0
    cap: float = 60.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise TransferError(f"re-request delays {self.first} s .. {self.cap} s are not 0 < first <= cap",
                                "give a positive first delay no longer than the cap")
        if not 0 <= self.jitter <= 1:
            raise TransferError(f"re-request jitter {self.jitter} is outside 0..1", "use e.g. 0.25")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds of silence before re-request number ``attempt + 1`` (``attempt`` made since the last progress).

        Never below ``first`` nor above ``cap * (1 + jitter)``.
        """
        base = min(self.cap, self.first * 2.0 ** min(attempt, 30))
        return base * (1.0 + self.jitter * rng.random())


@dataclass
class QuietTimer:
    """One transfer's re-request clock. ``progress(now)`` when a frame arrives or a request goes out fresh;
    ``due(now)`` says whether to ask again for everything in flight; ``asked_again(now)`` records that it did.

    ``attempts`` counts the re-requests since the last progress: a caller gives up after so many.
    """

    backoff: Backoff = field(default_factory=Backoff)
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0
    last_progress: float = 0.0
    quiet_since: float = 0.0  # the last progress or re-request: the current delay counts from here
    wait: float = 0.0

    def __post_init__(self) -> None:
        self.wait = self.backoff.delay(0, self.rng)

    def progress(self, now: float) -> None:
        """A frame arrived (or the transfer starts, or starts again on a new connection): the silence starts
        again and the backoff resets."""
        if self.attempts:
            self.attempts = 0
            self.wait = self.backoff.delay(0, self.rng)
        self.last_progress = self.quiet_since = now

    def due(self, now: float) -> bool:
        """True once the transfer has been quiet for the current delay."""
        return now - self.quiet_since >= self.wait

    def asked_again(self, now: float) -> None:
        """The caller re-requested what was in flight: the next re-request waits longer (up to the cap)."""
        self.attempts += 1
        self.quiet_since = now
        self.wait = self.backoff.delay(self.attempts, self.rng)

    def silent_for(self, now: float) -> float:
        """Seconds since the last progress (re-requests do not end a silence)."""
        return now - self.last_progress
