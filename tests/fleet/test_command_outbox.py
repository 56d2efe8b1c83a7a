"""A drift-policy command the MQTT client refuses is kept in the database and sent once by the leader's tick.

A real fleet server on a real mosquitto, on SQLite and on PostgreSQL. The broker is stopped and paho's
65,535 QoS 1 packet ids are taken (the way FleetMqtt refuses a publish, tests/fleet/test_part_serving.py);
an operator then accepts a data-drift alert: the alert is decided and the device's rebase-drift command
is refused, kept, and stays kept through ticks that are refused again. With the broker back, the tick
sends it, signed, exactly once. The trusted-key push needs no outbox (its tick derives who lacks the set):
refused after a rotation, it is sent once to each online device when the broker is back. Also: migration
0011 upgrades a database at 0010 with its rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import select
from typer.testing import CliRunner

from bench._fleet_broker import BROKER_LIMITS
from fleet_server.cli import app
from fleet_server.config import FleetSettings
from fleet_server.db import Database, DeviceRow, ReplicaRow, UnsentCommandRow
from fleet_server.drift_alerts import decide, new_alert
from fleet_server.migrate import alembic_config, head_revision
from fleet_server.server import FleetServer
from tests.fleet.test_db_upgrade import differences
from tests.support.broker import Broker, Listener
from tests.support.fleet_seed import device_id, seed_deployable
from tests.support.waiting import wait_until
from toco_core.drift_kind import DATA
from toco_core.messages import MessageKind, RebaseDriftCommand, TrustKeysCommand, parse_message
from toco_core.topics import Topics

FLEET = "outbox"
T = Topics(FLEET)
PACKET_IDS = 65_535


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker(["allow_anonymous true", *BROKER_LIMITS])
    b.start()
    yield b
    b.cleanup()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'fleet.db'}"


def kept(db: Database) -> list[UnsentCommandRow]:
    with db.session() as s:
        rows = s.scalars(select(UnsentCommandRow)).all()
        s.expunge_all()
        return list(rows)


def test_a_refused_rebase_command_is_kept_and_the_tick_sends_it_once_when_the_broker_is_back(broker, db_url,
                                                                                               tmp_path):
    settings = FleetSettings(data_dir=tmp_path / "data", broker=broker.url, http_port=0, fleet=FLEET, tick_s=0.3,
                             db_url=db_url)
    server = FleetServer(settings).start()
    listener = None
    try:
        seed_deployable(server.db, settings.data_dir, 2, key=server.key)
        box = device_id(0)
        with server.db.session(write=True) as s:
            alert = new_alert(s, s.get(DeviceRow, box), model_id="m-deploy", bundle_id=None, kind=DATA,
                              why="input shift", point={"window": 3, "t": time.time()})
            decide(alert, "open", "data drift")
            alert_id = alert.id

        fill_packet_ids(server, broker)
        refused_before = server.mqtt.stats["refused"]

        view = server.drift_actions.accept(alert_id=alert_id, scope="device")
        assert view["status"] == "accepted"  # the operator's decision stands; the command waits
        assert server.mqtt.stats["refused"] > refused_before
        rows = kept(server.db)
        assert [r.device_id for r in rows] == [box], rows
        stored = parse_message(MessageKind.CMD, rows[0].command)
        assert isinstance(stored, RebaseDriftCommand) and stored.alert_id == alert_id and stored.signature is None
        # the leader's tick keeps trying while publishing is refused: still kept, once
        assert wait_until(lambda: kept(server.db) and kept(server.db)[0].attempts >= 2, 10, 0.2)
        assert len(kept(server.db)) == 1

        broker.start()
        listener = Listener(broker.port, [T.device(MessageKind.CMD, "+")])
        assert wait_until(server.mqtt.connected.is_set, 15)

        def rebases() -> list[RebaseDriftCommand]:
            with listener.lock:
                found = [parse_message(MessageKind.CMD, p) for t, p, _ in listener.messages if p != b"queued"]
            return [c for c in found if isinstance(c, RebaseDriftCommand)]

        assert wait_until(lambda: not kept(server.db), 20, 0.2), kept(server.db)
        assert wait_until(lambda: len(rebases()) >= 1, 10, 0.1)
        time.sleep(1.5)  # several more ticks: nothing is sent again
        got = rebases()
        assert len(got) == 1, got
        cmd = got[0]
        assert cmd.cmd_id == stored.cmd_id and cmd.alert_id == alert_id and cmd.reason == "accepted"
        assert cmd.device_id == box and cmd.signature and cmd.signer  # signed when it went out
        assert kept(server.db) == []
    finally:
        if listener is not None:
            listener.close()
        server.stop()


def fill_packet_ids(server: FleetServer, broker: Broker) -> None:
    """Stop the broker and take every QoS 1 packet id of the server's MQTT client: its next publish is refused."""
    broker.stop()
    assert wait_until(lambda: not server.mqtt.connected.is_set(), 10)
    for _ in range(PACKET_IDS):
        server.mqtt.send(T.device(MessageKind.CMD, "nobody"), b"queued", 1, False)


def test_a_refused_trusted_key_push_is_sent_once_by_a_later_tick(broker, tmp_path):
    data = tmp_path / "data"
    settings = FleetSettings(data_dir=data, broker=broker.url, http_port=0, fleet=FLEET, tick_s=0.3)
    server = FleetServer(settings).start()
    listener = None
    try:
        seed_deployable(server.db, data, 2, key=server.key)
        online = sorted([device_id(0), device_id(1)])
        fill_packet_ids(server, broker)
        out = CliRunner().invoke(app, ["keys", "rotate", "--overlap", "1h", "--data-dir", str(data)])
        assert out.exit_code == 0, out.output
        refused = server.mqtt.stats["refused"]
        assert server.key_distributor.tick() == 0  # refused: not raised, nothing marked sent
        assert server.mqtt.stats["refused"] > refused

        broker.start()
        listener = Listener(broker.port, [T.device(MessageKind.CMD, "+")])

        def pushes() -> list[tuple[str, TrustKeysCommand]]:
            with listener.lock:
                found = [(t, parse_message(MessageKind.CMD, p)) for t, p, _ in listener.messages if p != b"queued"]
            return [(T.parse(t).device_id or "", c) for t, c in found if isinstance(c, TrustKeysCommand)]

        assert wait_until(lambda: len(pushes()) >= len(online), 20, 0.2), pushes()
        time.sleep(1.5)  # several more ticks: nothing is sent again
        got = pushes()
        assert sorted(d for d, _ in got) == online, got
        assert all(len(c.keys) == 2 for _, c in got)  # the old and the new key
    finally:
        if listener is not None:
            listener.close()
        server.stop()


def test_migration_0011_upgrades_a_database_at_0010_and_keeps_its_rows(db_url):
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(connection=conn), "0010_replicas")
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO replicas (client_id, replica_id, identity, mqtt_user, session_expiry_s, "
                                 "started_at) VALUES ('toco-fleet-f-r1', 'r1', 'r1', NULL, 60, 1.0)"))
        assert "unsent_commands" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
    db = Database(db_url)
    try:
        assert db.schema.before == "0010_replicas" and db.schema.after == head_revision()
        with db.session(write=True) as s:
            assert s.get(ReplicaRow, "toco-fleet-f-r1").replica_id == "r1"
            s.add(UnsentCommandRow(device_id="cam-1", command=b"{}", created_at=2.0, attempts=1))
        with db.session() as s:
            row = s.scalars(select(UnsentCommandRow)).one()
            assert (row.id, row.device_id, row.attempts, row.last_error) == (1, "cam-1", 1, None)
    finally:
        db.close()
    assert differences(db_url) == []
