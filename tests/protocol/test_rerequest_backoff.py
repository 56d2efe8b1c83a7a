"""The re-request rule itself (toco_core.rerequest): silence first, then doubling delays up to a cap, jittered."""

from __future__ import annotations

import random

import pytest

from toco_core.errors import TransferError
from toco_core.rerequest import Backoff, QuietTimer


def test_delays_double_from_the_first_up_to_the_cap_and_jitter_only_stretches_them() -> None:
    backoff = Backoff(first=10.0, cap=60.0, jitter=0.25)
    rng = random.Random(7)
    for attempt, base in enumerate((10.0, 20.0, 40.0, 60.0, 60.0, 60.0)):
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert base <= min(delays) and max(delays) <= base * 1.25
        assert max(delays) - min(delays) > base * 0.1  # spread out: boxes that went quiet together do not sync
    assert Backoff(jitter=0.0).delay(1000, rng) == 60.0  # no overflow far past the cap


def test_frames_restart_the_silence_and_reset_the_backoff() -> None:
    timer = QuietTimer(Backoff(first=1.0, cap=4.0, jitter=0.0))
    timer.progress(100.0)
    assert not timer.due(100.9)
    timer.progress(100.9)  # a frame: the silence starts again
    assert not timer.due(101.8) and timer.due(101.9)
    timer.asked_again(101.9)
    assert timer.attempts == 1 and not timer.due(103.8) and timer.due(103.9)  # 2 s now
    timer.asked_again(103.9)
    assert not timer.due(107.8) and timer.due(107.9)  # 4 s
    timer.asked_again(107.9)
    assert timer.due(111.9) and timer.attempts == 3  # capped at 4 s
    assert timer.silent_for(111.9) == pytest.approx(11.0)  # re-requests do not end the silence
    timer.progress(112.0)
    assert timer.attempts == 0 and not timer.due(112.9) and timer.due(113.0)


def test_bad_settings_are_refused_with_a_hint() -> None:
    with pytest.raises(TransferError, match="0 < first <= cap"):
        Backoff(first=0.0)
    with pytest.raises(TransferError, match="0 < first <= cap"):
        Backoff(first=90.0, cap=60.0)
    with pytest.raises(TransferError, match="jitter"):
        Backoff(jitter=2.0)
