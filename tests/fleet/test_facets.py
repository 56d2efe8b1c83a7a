"""The overview's counts from one GROUP BY (fleet_server.device_facets) against a GROUP BY per facet with the
listing's SQL filters (what the page itself is filtered by), on SQLite and PostgreSQL, for every filter value,
pairs of filters and the id search, over a seeded fleet (tests/support/fleet_seed.py)."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import func, select

from fleet_server.db import Database, DeviceRow
from fleet_server.device_facets import ALERT_KINDS, STATES, Combination, count_facets, state_expression
from fleet_server.device_listing import DeviceQuery, _filters, device_page
from fleet_server.model_versions import bundle_versions
from tests.support.fleet_seed import GROUPS, MODELS, seed_fleet

N = 2_000  # every stride of the seed (revoked devices are every 1,000th) appears twice

VALUES = {"state": list(STATES), "alert": [*ALERT_KINDS, "any", "none"],
          "group": [f"line-{g:02d}" for g in range(0, GROUPS, 7)] + ["no-such-group"],
          "version": [*MODELS, "none", "m-unknown"]}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded(request, tmp_path_factory):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('facets') / 'fleet.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database("facets")
    db = Database(url)
    seed_fleet(db, N)
    with db.session(write=True) as s:  # the seed's alert flag follows its kind; a real device's need not
        for device_id, alert, kind in [("dev-00000", True, None), ("dev-00001", False, "data"),
                                       ("dev-00002", True, None), ("dev-00006", False, "fidelity")]:
            row = s.get(DeviceRow, device_id)
            row.alert, row.drift_kind = alert, kind
    yield db
    db.close()


def expected(db: Database, query: DeviceQuery) -> tuple[int, dict, dict, dict, dict]:
    """The total and each facet's counts by one GROUP BY per facet under the SQL filters of every other facet
    (as device_listing counted before the single scan)."""
    filters = _filters(query)

    def others(name: str) -> list:
        return [clause for key, clause in filters.items() if key != name]

    def counts(key, name: str) -> dict:
        with db.session() as s:
            return dict(s.execute(select(key, func.count()).where(*others(name)).group_by(key)).all())

    with db.session() as s:
        total = s.scalar(select(func.count()).select_from(DeviceRow).where(*filters.values())) or 0
        per_bundle = counts(DeviceRow.active_bundle, "version")
        versions = bundle_versions(s, set(per_bundle) - {None})
    per_version: dict = {}
    for bundle, n in per_bundle.items():
        key = versions[bundle]["model_id"] if bundle in versions else None
        per_version[key] = per_version.get(key, 0) + n
    states, kinds = counts(state_expression(), "state"), counts(DeviceRow.drift_kind, "alert")
    return (total, {st: states.get(st, 0) for st in STATES}, {k: kinds.get(k, 0) for k in ALERT_KINDS},
            dict(sorted(counts(DeviceRow.group, "group").items())), per_version)


def queries() -> list[dict]:
    singles = [{name: value} for name, values in VALUES.items() for value in values]
    pairs = [{a: va, b: vb} for (a, b) in itertools.combinations(VALUES, 2)
             for va, vb in itertools.product(VALUES[a][:4], VALUES[b][:3])]
    return [{}, *singles, *pairs, {"q": "0042"}, {"q": "dev-01", "state": "offline", "alert": "any"},
            {"state": "alert", "group": "line-05", "alert": "fidelity", "version": "m-seed-v2"}]


def test_one_scan_counts_what_a_group_by_per_facet_counts(seeded):
    for params in queries():
        query = DeviceQuery(limit=5, **params)
        page = device_page(seeded, query)
        total, states, kinds, groups, versions = expected(seeded, query)
        assert page.facets is not None
        got = (page.total, page.facets.state, page.facets.alert, page.facets.group,
               {v.model_id: v.devices for v in page.facets.version})
        assert got == (total, states, kinds, groups, versions), params
        # the page's own total (no facets) is a count of the same filter
        assert device_page(seeded, DeviceQuery(limit=5, facets=False, **params)).total == total, params
    # the seed puts devices in every state and alert kind, so the comparison covered non-zero counts
    full = device_page(seeded, DeviceQuery(limit=1))
    assert full.facets is not None and all(full.facets.state.values()) and all(full.facets.alert.values())


def test_a_name_that_is_no_facet_is_refused():
    with pytest.raises(ValueError, match="colour"):
        count_facets([Combination("online", False, None, "g", None, 1)], {"colour": "red"}, {})
