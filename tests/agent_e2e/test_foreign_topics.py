"""The agent parses only messages on its own topics, whatever the broker delivers (amqtt hands
retained messages to subscribers whose filter does not match): real mosquitto, exact topic paths."""

from __future__ import annotations

import logging

from agent.mqtt_link import MqttLink
from tests.agent_e2e.conftest import FLEET, wait_for
from toco_core.messages import MessageKind, RollbackCommand, encode
from toco_core.topics import Topics

ME, OTHER = "box-ft", "box-ft-other"
SHA = "ab" * 32


def test_owns_names_exactly_the_topics_a_device_receives(tmp_path):
    link = MqttLink(url="mqtt://127.0.0.1:1", fleet=FLEET, device_id=ME, state_dir=tmp_path)
    t, elsewhere = Topics(FLEET), Topics("other-fleet")
    assert link.owns(t.device(MessageKind.CMD, ME)) is MessageKind.CMD
    assert link.owns(t.manifest(SHA)) is MessageKind.MANIFEST
    assert link.owns(t.chunk(SHA, 3)) is MessageKind.CHUNK
    for foreign in (t.device(MessageKind.CMD, OTHER), elsewhere.device(MessageKind.CMD, ME),
                    t.device(MessageKind.STATE, ME), t.device(MessageKind.STATUS, ME), t.get(SHA, ME),
                    t.device(MessageKind.CMD, ME) + "/extra", f"{t.prefix}/bundles/not-a-sha/manifest", "x/y"):
        assert link.owns(foreign) is None, foreign


def test_retained_messages_on_foreign_topics_are_dropped_unparsed(fleet, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="toco.agent.mqtt")
    t = fleet.topics
    own = t.device(MessageKind.CMD, ME)
    foreign = [t.device(MessageKind.CMD, OTHER),                   # another device's commands
               Topics("other-fleet").device(MessageKind.CMD, ME),  # the same id in another fleet
               t.device(MessageKind.STATUS, ME),                   # a topic this device publishes
               t.chunk(SHA, 0)]                                    # ours, but no command topic
    payload = encode(RollbackCommand(cmd_id="foreign", reason="not for box-ft"))
    for topic in foreign:  # retained before the agent connects: delivered on subscribe
        fleet.listener.publish(topic, payload, retain=True)
    fleet.listener.publish(own, encode(RollbackCommand(cmd_id="mine")), retain=True)
    link = MqttLink(url=fleet.broker.url, fleet=FLEET, device_id=ME, state_dir=tmp_path)
    got: list[tuple[str, str]] = []
    # A filter wider than the device's own topics stands for a broker delivering what no filter
    # of the agent names: every foreign message above now really reaches the dispatcher.
    link.on("toco/#", MessageKind.CMD, lambda topic, cmd: got.append((topic, cmd.cmd_id)))
    link.start()
    try:
        assert link.wait_connected(10)
        assert wait_for(lambda: got and link.stats["foreign"] >= len(foreign), 10), (got, link.stats)
        assert got == [(own, "mine")]
        assert link.stats["dropped"] == 0  # dropped before parsing, not as invalid payloads
        logged = {r.fields["topic"] for r in caplog.records if "not ours" in r.getMessage()}
        assert set(foreign) <= logged
    finally:
        link.stop()
        for topic in [*foreign, own]:
            fleet.listener.publish(topic, b"", retain=True)  # clear the retained messages
