"""The overview's counts in one scan: the filter's total and the devices per state, alert kind, group and version.

Each count used to be a GROUP BY of its own (five scans of the devices table per dashboard poll). On
PostgreSQL, whose device rows carry the hardware, plan and drift JSON and are rewritten by every
telemetry point, each scan read the whole table: 4-15 ms apiece at 10,000 devices, most of the
paged request (docs/topology.md, "The paged overview at 10,000 devices"). Now one GROUP BY over
every column a filter or a facet reads returns a *combination* per distinct (state, alert, drift
kind, group, bundle) with its device count, a few hundred for a fleet of 10,000, and the counts
are summed here, each under every filter but its own, with the filters' Python twins below.

The twins must say what the SQL filters of fleet_server.device_listing say; tests/fleet/test_facets.py
compares the two on every filter and pair of filters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import case, func, not_, select
from sqlalchemy.sql.elements import ColumnElement

from fleet_server.db import DeviceRow

STATES = ("online", "deploying", "alert", "failed", "offline", "quarantined", "revoked")
ALERT_KINDS = ("fidelity", "data", "unclassified")
NO_VERSION = "none"  # the version filter's value for devices running no version the server built
FACETS = ("state", "alert", "group", "version")


class VersionCount(BaseModel):
    """Devices running one model version (model_id None: no version the server built)."""

    model_id: str | None
    name: str | None
    version: int | None
    devices: int


class Facets(BaseModel):
    """Device counts per value of each filter, each under every filter but its own."""

    state: dict[str, int]
    alert: dict[str, int]
    group: dict[str, int]
    version: list[VersionCount]


@dataclass(frozen=True)
class Combination:
    """Devices sharing every value the filters and facets read (one row of combinations())."""

    state: str
    alert: bool
    drift_kind: str | None
    group: str
    bundle: str | None
    devices: int


def state_expression() -> ColumnElement[str]:
    """fleet_server.views.device_state as SQL (the same precedence), so a state is filtered and counted
    by the database."""
    d = DeviceRow
    return case((d.enrollment.in_(("revoked", "quarantined")), d.enrollment),
                (not_(d.online), "offline"),
                (d.deploy_state == "deploying", "deploying"),
                (d.alert, "alert"),
                (d.deploy_state == "failed", "failed"),
                else_="online")


def combinations(s: Any, where: list[ColumnElement[bool]]) -> list[Combination]:
    """One GROUP BY of the devices matching ``where`` (the id search; the facet filters are applied in
    Python, as each facet leaves its own out). Takes an open Session; returns the combinations."""
    d, state = DeviceRow, state_expression()
    keys = (state, d.alert, d.drift_kind, d.group, d.active_bundle)
    rows = s.execute(select(*keys, func.count()).where(*where).group_by(*keys)).all()
    return [Combination(st, bool(alert), kind, group, bundle, n) for st, alert, kind, group, bundle, n in rows]


def _matches(c: Combination, name: str, value: str, versions: Mapping[str, dict[str, Any]]) -> bool:
    """Whether the devices of ``c`` pass the filter ``name=value`` (device_listing's SQL filter, in Python)."""
    if name == "state":
        return c.state == value
    if name == "group":
        return c.group == value
    if name == "alert":
        if value == "any":
            return c.alert or c.drift_kind is not None
        if value == "none":
            return not c.alert and c.drift_kind is None
        return c.drift_kind == value
    if name == "version":
        version = versions.get(c.bundle or "")
        return version is None if value == NO_VERSION else version is not None and version["model_id"] == value
    raise ValueError(f"no facet filter {name!r}")


def _version_counts(counts: Mapping[str | None, int], versions: Mapping[str, dict[str, Any]]) -> list[VersionCount]:
    """Devices per bundle merged per version (bundles of one version, and unknown ones, add up)."""
    merged: dict[str | None, VersionCount] = {}
    for bundle, n in counts.items():
        v = versions.get(bundle or "")
        key = v["model_id"] if v is not None else None
        if key not in merged:
            merged[key] = VersionCount(model_id=key, name=v["name"] if v else None,
                                       version=v["version"] if v else None, devices=0)
        merged[key].devices += n
    return sorted(merged.values(), key=lambda v: (v.name or "~", v.version or 0))


def count_facets(combos: list[Combination], selected: Mapping[str, str],
                 versions: Mapping[str, dict[str, Any]]) -> tuple[int, Facets]:
    """The total of the devices passing every ``selected`` filter (facet name -> value) and the Facets,
    each counted under every selected filter but its own. ``versions`` is
    fleet_server.model_versions.bundle_versions of the combinations' bundles.
    Raises ValueError for a name that is not a facet (FACETS), once there is a combination to test."""
    passes = [{name: _matches(c, name, value, versions) for name, value in selected.items()} for c in combos]
    total = sum(c.devices for c, ok in zip(combos, passes, strict=True) if all(ok.values()))

    def counts(facet: str, key) -> dict[Any, int]:
        out: dict[Any, int] = {}
        for c, ok in zip(combos, passes, strict=True):
            if all(v for name, v in ok.items() if name != facet):
                out[key(c)] = out.get(key(c), 0) + c.devices
        return out

    states = counts("state", lambda c: c.state)
    kinds = counts("alert", lambda c: c.drift_kind)
    return total, Facets(state={st: states.get(st, 0) for st in STATES},
                         alert={k: kinds.get(k, 0) for k in ALERT_KINDS},
                         group=dict(sorted(counts("group", lambda c: c.group).items())),
                         version=_version_counts(counts("version", lambda c: c.bundle), versions))
