"""The overview at 10,000 devices: the paged, filtered GET /api/devices and the dashboard's device table
over it, in real Chromium. The devices are written straight into the server's database
(tests/support/fleet_seed.py); which filter must return which device follows from the seed."""

from __future__ import annotations

import os
from collections import Counter
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from fleet_server.views import device_state
from tests.dashboard.conftest import Fleet, log_in, screenshot
from tests.dashboard.test_dashboard import open_view
from tests.support.broker import MOSQUITTO, Broker
from tests.support.fleet_seed import BUNDLES, GROUPS, MODELS, device_id, seed_fleet
from tests.support.waiting import wait_until

N = 10_000


@pytest.fixture(scope="module")
def big_fleet(tmp_path_factory):
    """A server on a fresh mosquitto with 10,000 seeded devices (``big_fleet.rows``: what was written)."""
    if not os.path.exists(MOSQUITTO):
        pytest.fail(f"{MOSQUITTO} is missing: apt-get install mosquitto")
    broker = Broker()
    broker.start()
    f = Fleet(tmp_path_factory.mktemp("big-fleet"), broker.url)
    try:
        f.rows = seed_fleet(f.server.db, N)
        yield f
    finally:
        f.stop()
        broker.cleanup()


def state_of(row: dict) -> str:
    """The state the server's Python view gives a seeded row (the oracle of the SQL state filter)."""
    return device_state(SimpleNamespace(**row))  # type: ignore[arg-type]  # a seeded row has DeviceRow's fields


def walk(fleet, **params) -> tuple[list[str], set[int]]:
    """Every device id of a filtered listing, page by page (200 a page, no facets); and the totals seen."""
    ids, totals, cursor = [], set(), None
    while True:
        r = fleet.api.get("/api/devices", params={**params, "limit": 200, "facets": "false",
                                                  **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        ids += [d["device_id"] for d in page["devices"]]
        totals.add(page["total"])
        cursor = page["next_cursor"]
        if cursor is None:
            return ids, totals


def sql_count(fleet, where: str, **params) -> int:
    with fleet.server.db.session() as s:
        return s.execute(text(f"SELECT count(*) FROM devices WHERE {where}"), params).scalar_one()


def test_paging_walks_every_device_exactly_once_in_id_order(big_fleet):
    ids, totals = walk(big_fleet)
    assert ids == [device_id(i) for i in range(N)]
    assert totals == {N}
    assert sql_count(big_fleet, "1 = 1") == N


def test_each_filter_returns_exactly_its_devices(big_fleet):
    rows = big_fleet.rows
    oracle = {  # filter -> the ids it must return, from the seeded rows
        ("state", "alert"): {r["id"] for r in rows if state_of(r) == "alert"},
        ("state", "quarantined"): {r["id"] for r in rows if state_of(r) == "quarantined"},
        ("alert", "data"): {r["id"] for r in rows if r["drift_kind"] == "data"},
        ("alert", "any"): {r["id"] for r in rows if r["alert"] or r["drift_kind"]},
        ("group", "line-03"): {r["id"] for r in rows if r["group"] == "line-03"},
        ("version", "m-seed-v1"): {r["id"] for r in rows
                                   if (r["active"] or {}).get("bundle_id") == BUNDLES["m-seed-v1"]},
        ("version", "none"): {r["id"] for r in rows if (r["active"] or {}).get("bundle_id") not in BUNDLES.values()},
        ("q", "DEV-0424"): {r["id"] for r in rows if "dev-0424" in r["id"]},
    }
    for (name, value), expected in oracle.items():
        ids, totals = walk(big_fleet, **{name: value})
        assert set(ids) == expected and len(ids) == len(expected), (name, value)
        assert totals == {len(expected)}, (name, value)
    # the same counts straight from the table
    assert len(oracle[("alert", "data")]) == sql_count(big_fleet, "drift_kind = 'data'")
    assert len(oracle[("group", "line-03")]) == sql_count(big_fleet, '"group" = :g', g="line-03")
    assert len(oracle[("version", "m-seed-v1")]) == sql_count(
        big_fleet, "json_extract(active, '$.bundle_id') IN (SELECT id FROM bundles WHERE model_id = 'm-seed-v1')")
    # filters combine with AND
    both = {r["id"] for r in rows if r["group"] == "line-05" and r["drift_kind"] == "fidelity"}
    assert set(walk(big_fleet, group="line-05", alert="fidelity")[0]) == both
    assert both and len(both) == sql_count(big_fleet, "\"group\" = 'line-05' AND drift_kind = 'fidelity'")


def test_facets_count_each_value_under_the_other_filters(big_fleet):
    rows = big_fleet.rows
    page = big_fleet.api.get("/api/devices", params={"limit": 1}).json()
    assert page["facets"]["state"] == {st: n for st, n in Counter(state_of(r) for r in rows).items()} | {
        st: 0 for st in page["facets"]["state"] if st not in {state_of(r) for r in rows}}
    assert page["facets"]["group"] == {f"line-{g:02d}": N // GROUPS for g in range(GROUPS)}
    versions = {v["model_id"]: v["devices"] for v in page["facets"]["version"]}
    assert set(versions) == set(MODELS) | {None} and sum(versions.values()) == N
    # a selected state keeps the other states' counts (the counts stay a way to switch), the groups narrow
    page = big_fleet.api.get("/api/devices", params={"state": "alert", "limit": 1}).json()
    assert page["facets"]["state"]["online"] == sum(state_of(r) == "online" for r in rows)
    assert page["facets"]["group"]["line-05"] == sum(state_of(r) == "alert" and r["group"] == "line-05" for r in rows)


def test_a_search_by_id_finds_the_device(big_fleet):
    page = big_fleet.api.get("/api/devices", params={"q": "dev-04242"}).json()
    assert [d["device_id"] for d in page["devices"]] == ["dev-04242"] and page["total"] == 1
    assert page["devices"][0]["model_version"] == {"model_id": "m-seed-v2", "name": "lenet5", "version": 2}
    assert big_fleet.api.get("/api/devices", params={"q": "%"}).json()["total"] == 0  # a LIKE wildcard is a character


@pytest.mark.parametrize("params, named", [({"state": "sleeping"}, "state"), ({"limit": 0}, "limit"),
                                           ({"limit": 201}, "limit"), ({"cursor": "%%%"}, "cursor"),
                                           ({"alert": "big"}, "alert"), ({"colour": "red"}, "colour")])
def test_bad_query_values_are_refused_with_a_message_naming_them(big_fleet, params, named):
    r = big_fleet.api.get("/api/devices", params=params)
    assert r.status_code == 422
    assert named in r.json()["detail"]


@pytest.fixture
def big_page(browser, big_fleet):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    log_in(pg, big_fleet.url, big_fleet.token)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, f"browser errors: {errors}"


def shown(page) -> tuple[int, list[str]]:
    """(the total the table says, the device ids of its rows)."""
    total = int(page.locator("#devices-summary").get_attribute("data-total"))
    return total, page.locator("#devices tbody tr").evaluate_all("rows => rows.map(r => r.dataset.device)")


def settle(page, total: int, first: str | None = None) -> None:
    """Wait until the table shows ``total`` (and, if given, ``first`` as its first row)."""
    assert wait_until(lambda: shown(page)[0] == total and (first is None or shown(page)[1][:1] == [first]), 10), \
        (shown(page)[0], shown(page)[1][:3], total, first)


def test_the_overview_pages_filters_and_searches_10000_devices(big_fleet, big_page, tmp_path):
    rows, page = big_fleet.rows, big_page
    open_view(page, big_fleet.url + "/")
    total, ids = shown(page)
    assert total == N and ids == [device_id(i) for i in range(50)]
    assert page.locator(".count.total b").inner_text() == "10,000"
    assert "1–50 of 10,000" in page.locator("#devices-summary").inner_text()

    page.select_option("#filter-alert", "data")
    data = sorted(r["id"] for r in rows if r["drift_kind"] == "data")
    settle(page, len(data), data[0])
    assert shown(page)[1] == data[:50]
    page.select_option("#filter-group", "line-05")
    both = sorted(r["id"] for r in rows if r["drift_kind"] == "data" and r["group"] == "line-05")
    settle(page, len(both), both[0])
    assert shown(page)[1] == both
    screenshot(page, tmp_path, "overview-10000-filtered")
    assert page.locator(".count.total b").inner_text() == str(len(both))  # the state counts narrowed too

    page.select_option("#filter-alert", "")
    page.select_option("#filter-group", "")
    settle(page, N, device_id(0))
    page.fill("#filter-q", "dev-04242")
    settle(page, 1, "dev-04242")
    page.fill("#filter-q", "")
    settle(page, N, device_id(0))

    page.click("#page-next")
    settle(page, N, device_id(50))
    assert "51–100 of 10,000" in page.locator("#devices-summary").inner_text()
    assert page.locator("#devices tbody tr").count() == 50
    page.click("#page-prev")
    settle(page, N, device_id(0))
