"""The paged, filtered device listing: what the overview shows of a fleet of 10,000 devices.

A page is at most ``limit`` devices in device-id order after a cursor (keyset paging: a deep page
costs what the first does, and a device that joins or leaves between two requests neither repeats
nor skips another), with the number of devices the filter matches and the facet counts (devices
per state, alert kind, group and model version). The counts come from one GROUP BY in the database
(fleet_server.device_facets); no request reads more device rows than the page it returns.

A facet counts under every filter but its own, so the state counts still show the other states
while one state is selected (the dashboard's counts stay a way to switch between them).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import and_, func, not_, or_, select
from sqlalchemy.sql.elements import ColumnElement

from fleet_server.db import BundleRow, Database, DeviceRow
from fleet_server.device_facets import (
    NO_VERSION,
    Facets,
    combinations,
    count_facets,
    state_expression,
)
from fleet_server.model_versions import bundle_versions
from fleet_server.overview_cache import cached_combinations
from fleet_server.views import device_view

StateName = Literal["online", "deploying", "alert", "failed", "offline", "quarantined", "revoked"]


class DeviceQuery(BaseModel):
    """The query string of ``GET /api/devices``: filters (all optional, combined with AND) and the page."""

    model_config = ConfigDict(extra="forbid")
    state: StateName | None = Field(None, description="the device's state (fleet_server.views.device_state)")
    group: str | None = Field(None, max_length=64, description="the device's group, exactly")
    alert: Literal["fidelity", "data", "unclassified", "any", "none"] | None = Field(
        None, description="the kind of the device's drift alert; any: some alert; none: no alert")
    version: str | None = Field(None, max_length=40, description="the model_id of the version the device runs, "
                                                                 "or 'none' for no version the server built")
    q: str | None = Field(None, max_length=64, description="part of the device id (case-insensitive)")
    limit: int = Field(50, ge=1, le=200, description="devices per page")
    cursor: str | None = Field(None, max_length=200, description="next_cursor of the previous page")
    facets: bool = Field(True, description="count devices per state, alert kind, group and version")

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: Any) -> Any:
        # a form or a URL template sends "state=" for "any state"
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v != ""}
        return data

    @field_validator("cursor")
    @classmethod
    def _readable_cursor(cls, cursor: str | None) -> str | None:
        if cursor is not None:
            cursor_position(cursor)
        return cursor


class DevicePage(BaseModel):
    """One page of the device listing: Device objects (fleet_server.views.device_view, with
    ``model_version``) in device-id order, the filter's total, and the cursor of the next page."""

    devices: list[dict[str, Any]]
    total: int = Field(description="devices matching the filters, on every page")
    limit: int
    next_cursor: str | None = Field(description="the cursor of the next page; null on the last page")
    facets: Facets | None = None


def page_cursor(device_id: str) -> str:
    """The opaque cursor of the position just after ``device_id`` (URL-safe base64, no padding)."""
    return base64.urlsafe_b64encode(device_id.encode()).decode().rstrip("=")


def cursor_position(cursor: str) -> str:
    """The device id a cursor of page_cursor points after. Raises ValueError naming the problem
    (the API's 422) for anything page_cursor did not make."""
    try:
        position = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        position = ""
    if not position:
        raise ValueError("not a cursor of this listing: pass next_cursor of the previous page as it is")
    return position


def _filters(query: DeviceQuery) -> dict[str, ColumnElement[bool]]:
    """The WHERE clause of each given filter, by facet name (``q`` has no facet)."""
    d, out = DeviceRow, {}
    if query.state is not None:
        out["state"] = state_expression() == query.state
    if query.group is not None:
        out["group"] = d.group == query.group
    if query.alert == "any":
        out["alert"] = or_(d.alert, d.drift_kind.is_not(None))
    elif query.alert == "none":
        out["alert"] = and_(not_(d.alert), d.drift_kind.is_(None))
    elif query.alert is not None:
        out["alert"] = d.drift_kind == query.alert
    if query.version == NO_VERSION:
        bundle = DeviceRow.active_bundle  # kept with ``active`` (migration 0009): no JSON parsed per row
        out["version"] = or_(bundle.is_(None), bundle.not_in(select(BundleRow.id)))
    elif query.version is not None:
        out["version"] = DeviceRow.active_bundle.in_(select(BundleRow.id).where(BundleRow.model_id == query.version))
    if query.q is not None:
        out["q"] = d.id.icontains(query.q, autoescape=True)
    return out


def device_page(db: Database, query: DeviceQuery, counts_max_age_s: float = 0.0) -> DevicePage:
    """The page of devices ``query`` asks for, with the filter's total and (``query.facets``) the facets.

    Takes the Database, a validated DeviceQuery and how old reused counts may be
    (fleet_server.overview_cache; 0: counted for this call); returns a DevicePage. Raises nothing for
    a filter that matches no device (an empty page, total 0).
    """
    filters = _filters(query)
    where = list(filters.values())
    after = [DeviceRow.id > cursor_position(query.cursor)] if query.cursor else []
    with db.session() as s:
        # one row past the page says whether there is a next page, without a second query
        rows = list(s.scalars(select(DeviceRow).where(*where, *after).order_by(DeviceRow.id).limit(query.limit + 1)))
        more, rows = len(rows) > query.limit, rows[:query.limit]
        bundles = {r.active_bundle for r in rows}
        facets: Facets | None = None
        if query.facets:
            # the total and every facet from one GROUP BY (fleet_server.device_facets); only the id search,
            # which no facet leaves out, is applied by the database
            if "q" in filters:
                combos = combinations(s, [filters["q"]])
            else:
                combos = cached_combinations(db, counts_max_age_s, lambda: combinations(s, []))
            versions = bundle_versions(s, (bundles | {c.bundle for c in combos}) - {None})
            total, facets = count_facets(combos, _selected(query), versions)
        else:
            total = s.scalar(select(func.count()).select_from(DeviceRow).where(*where)) or 0
            versions = bundle_versions(s, bundles - {None})
    devices = [{**device_view(r), "model_version": versions.get(r.active_bundle or "")}
               for r in rows]
    return DevicePage(devices=devices, total=total, limit=query.limit, facets=facets,
                      next_cursor=page_cursor(rows[-1].id) if more else None)


def _selected(query: DeviceQuery) -> dict[str, str]:
    """The facet filters ``query`` sets, by facet name (fleet_server.device_facets.FACETS)."""
    chosen = {"state": query.state, "group": query.group, "alert": query.alert, "version": query.version}
    return {name: value for name, value in chosen.items() if value is not None}
