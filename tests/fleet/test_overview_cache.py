"""The overview's counts reused between polls (fleet_server.overview_cache) on a real seeded SQLite fleet: reused
while telemetry-like writes change nothing counted, counted again at once after a committed change to a counted
value in this process, and within the age limit after a change the process did not see (another replica's)."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter

import pytest

from fleet_server.db import Database, DeviceRow
from fleet_server.device_facets import combinations
from fleet_server.device_listing import DeviceQuery, device_page
from fleet_server.overview_cache import cached_combinations, generation
from tests.support.fleet_seed import seed_fleet

N = 300


@pytest.fixture()
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    seed_fleet(database, N)
    yield database
    database.close()


def _counts(db: Database, max_age_s: float, calls: list[int]) -> dict:
    def count():
        calls.append(1)
        return combinations(s, [])

    with db.session() as s:
        out: Counter = Counter()
        for c in cached_combinations(db, max_age_s, count):
            out[(c.state, c.group)] += c.devices
        return dict(out)


def test_counts_are_reused_until_a_counted_value_changes(db):
    calls: list[int] = []
    first = _counts(db, 60, calls)
    assert sum(first.values()) == N and len(calls) == 1
    assert _counts(db, 60, calls) == first and len(calls) == 1  # reused
    # what telemetry writes (last_seen) counts nothing: still reused
    before = generation()
    with db.session(write=True) as s:
        s.get(DeviceRow, "dev-00003").last_seen = time.time()
    assert generation() == before and _counts(db, 60, calls) == first and len(calls) == 1
    # a device going offline moves a state count: counted again at once
    with db.session(write=True) as s:
        row = s.get(DeviceRow, "dev-00003")
        was_online = row.online
        row.online = not was_online
    again = _counts(db, 60, calls)
    assert len(calls) == 2 and again != first and sum(again.values()) == N
    # a rolled back change counts nothing
    with pytest.raises(RuntimeError), db.session(write=True) as s:
        s.get(DeviceRow, "dev-00004").group = "elsewhere"
        s.flush()
        raise RuntimeError("abandoned")
    assert _counts(db, 60, calls) == again and len(calls) == 2
    assert _counts(db, 0, calls) == again and len(calls) == 3  # 0: counted every time


def test_a_change_this_process_did_not_see_shows_within_the_age_limit(db, tmp_path):
    calls: list[int] = []
    first = _counts(db, 0.5, calls)
    # another replica's write: a plain connection, no SQLAlchemy session of this process
    with sqlite3.connect(tmp_path / "fleet.db") as other:
        other.execute('UPDATE devices SET "group" = ? WHERE id = ?', ("moved", "dev-00005"))
    assert _counts(db, 0.5, calls) == first  # not yet: within the age limit
    time.sleep(0.6)
    later = _counts(db, 0.5, calls)
    assert len(calls) == 2 and any(group == "moved" for _, group in later)


def test_the_listing_shows_a_local_change_in_its_facets_at_once(db):
    query = DeviceQuery(limit=5)
    page = device_page(db, query, counts_max_age_s=60)
    assert page.facets is not None and page.total == N and "moved" not in page.facets.group
    with db.session(write=True) as s:
        s.get(DeviceRow, "dev-00007").group = "moved"
    page = device_page(db, query, counts_max_age_s=60)
    assert page.facets is not None and page.facets.group["moved"] == 1
    # the id search is counted by the database every time, whatever is kept
    searched = device_page(db, DeviceQuery(limit=5, q="dev-0000"), counts_max_age_s=60)
    assert searched.total == 10


def test_an_event_relayed_from_another_replica_outdates_the_counts_and_telemetry_does_not(db):
    """The dashboard reloads the overview on live events: after another replica's status event it must not be
    shown the counts from before it (the change reached this process only through the database)."""
    import json

    from fleet_server.event_relay import EventRelay
    from fleet_server.events import EventBus
    from toco_core.topics import Topics

    relay = EventRelay(EventBus(), Topics("default"), "replica-a", lambda *a: None)
    calls: list[int] = []
    _counts(db, 60, calls)

    def relayed(kind: str) -> None:
        relay.receive(json.dumps({"replica": "replica-b", "kind": kind, "data": {"device_id": "dev-00001"}}).encode())

    relayed("telemetry")
    _counts(db, 60, calls)
    assert len(calls) == 1
    relayed("status")
    _counts(db, 60, calls)
    assert len(calls) == 2 and relay.received == 2
    relay.receive(json.dumps({"replica": "replica-a", "kind": "status", "data": {}}).encode())  # its own echo
    _counts(db, 60, calls)
    assert len(calls) == 2
