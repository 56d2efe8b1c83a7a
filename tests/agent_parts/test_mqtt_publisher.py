"""The agent's publisher against a real mosquitto: acknowledged outbox rows leave its memory too."""

from __future__ import annotations

import os
import time

import pytest

from agent.mqtt_link import MqttLink
from tests.support.broker import MOSQUITTO, Broker, Listener
from tests.support.waiting import wait_until
from toco_core.messages import Phase, StatusMessage
from toco_core.topics import Topics

FLEET, DEV = "plant1", "cam-07"


def test_acknowledged_rows_are_forgotten_and_each_is_published_once(tmp_path) -> None:
    # Before: every row ever handed to paho stayed in a set, one entry per status, drift and
    # samples message for the life of the agent (a drift message every 256 inferences).
    if not os.path.exists(MOSQUITTO):
        pytest.fail(f"{MOSQUITTO} is missing: apt-get install mosquitto (make system-deps)")
    broker = Broker()
    broker.start()
    try:
        eyes = Listener(broker.port, [Topics(FLEET).device("status", DEV)])
        link = MqttLink(url=broker.url, fleet=FLEET, device_id=DEV, state_dir=tmp_path)
        link.start()
        assert link.wait_connected(5)
        n = 300
        for i in range(n):
            assert link.send(StatusMessage(device_id=DEV, phase=Phase.DOWNLOADING, progress=i / n))
        assert wait_until(lambda: link.outbox_size() == 0, 20)
        publisher = link._publisher
        assert wait_until(lambda: not publisher._handed, 5), len(publisher._handed)
        assert wait_until(lambda: len(eyes.on("/status")) >= n, 10)
        time.sleep(0.3)  # a second copy of any row would arrive by now
        assert len(eyes.on("/status")) == n
        link.stop()
        eyes.close()
    finally:
        broker.cleanup()
