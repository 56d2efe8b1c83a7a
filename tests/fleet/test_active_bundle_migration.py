"""Revision 0009_device_active_bundle on SQLite and PostgreSQL: a database at 0008 whose devices report
active bundles gets the bundle in its own column, and the listing's version filter reads it."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from fleet_server.db import Database, DeviceRow
from fleet_server.device_listing import DeviceQuery, device_page
from fleet_server.migrate import alembic_config
from tests.fleet.test_db_upgrade import differences

BEFORE = "0008_device_listing_indexes"
DEVICES = [("d-1", '{"bundle_id": "b1", "slot": "a"}'), ("d-2", None), ("d-3", '{"bundle_id": "b2"}')]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def database_at_0008(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(connection=conn), BEFORE)
        for device_id, active in DEVICES:
            conn.execute(text('INSERT INTO devices (id, "group", online, birth, last_seen, hardware, active, alert, '
                              "bad_messages, enrollment) VALUES (:id, 'line', false, 0, 1.0, '{}', :active, false, 0, "
                              "'enrolled')"), {"id": device_id, "active": active})
    engine.dispose()


def test_the_upgrade_fills_the_column_and_the_server_keeps_it_with_active(url):
    database_at_0008(url)
    db = Database(url)
    try:
        with db.session() as s:
            assert {d.id: d.active_bundle for d in s.query(DeviceRow)} == {"d-1": "b1", "d-2": None, "d-3": "b2"}
        with db.session(write=True) as s:
            s.get(DeviceRow, "d-2").active = {"bundle_id": "b3"}
            s.get(DeviceRow, "d-3").active = None
        with db.session() as s:
            assert {d.id: d.active_bundle for d in s.query(DeviceRow)} == {"d-1": "b1", "d-2": "b3", "d-3": None}
        # no bundle the server built: every device here (the database holds no bundles)
        page = device_page(db, DeviceQuery(version="none", limit=10))
        assert [d["device_id"] for d in page.devices] == ["d-1", "d-2", "d-3"] and page.total == 3
        assert page.facets is not None and sum(v.devices for v in page.facets.version) == 3
    finally:
        db.close()
    assert differences(url) == []


def test_the_downgrade_gives_back_0008(url):
    database_at_0008(url)
    Database(url).close()
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(connection=conn), BEFORE)
            rows = conn.execute(text("SELECT id FROM devices ORDER BY id")).scalars().all()
    finally:
        engine.dispose()
    assert rows == ["d-1", "d-2", "d-3"]
