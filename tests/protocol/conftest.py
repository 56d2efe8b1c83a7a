"""The protocol tests' mosquitto fixture; the helpers themselves live in tests/support.

Broker, Listener, MOSQUITTO, free_port and wait_until are re-exported here because many tests
import them from this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.broker import MOSQUITTO, Broker, Listener
from tests.support.processes import free_port
from tests.support.waiting import wait_until

__all__ = ["MOSQUITTO", "Broker", "Listener", "broker", "free_port", "wait_until"]


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A fresh mosquitto for one test."""
    if not os.path.exists(MOSQUITTO):
        pytest.fail(f"{MOSQUITTO} is missing: apt-get install mosquitto (make system-deps)")
    b = Broker()
    b.start()
    yield b
    b.cleanup()
