"""Model versions: a model name is a lineage v1 <- v2 <- ..., and which version a device runs.

Each version is its own ModelRow (own files, analyses, bundles, deployments, exactly as a model
was before versions), numbered per name; ``lineage_id`` (v1's id) is what all versions share.
Bundles are signed with the lineage id as their model id and a sequence counted over the whole
lineage (fleet_server.bundle_sequence), so a device that took v2 refuses v1's bundle unless a
signed rollback command names it (fleet_server.version_rollback).

Devices do not report a version: the server derives it from the bundle a device reports active
(bundle -> the version it was built from), so agents of any release show their version.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from typing import Any

from sqlalchemy import func, select

from fleet_server.db import BundleRow, Database, DeviceRow, ModelRow
from fleet_server.enrollment import ENROLLED
from fleet_server.registry import NotFoundError


def next_version(s, name: str) -> tuple[int, str | None, str | None]:
    """(version, parent id, lineage id) for a new upload named ``name`` inside the caller's write session:
    (1, None, None) for a new name (the caller uses the new row's id as its lineage), else one above
    the newest version, whose id becomes the parent."""
    newest = s.scalars(select(ModelRow).where(ModelRow.name == name).order_by(ModelRow.version.desc()).limit(1)).first()
    if newest is None:
        return 1, None, None
    return newest.version + 1, newest.id, newest.lineage_id or newest.id


def lineage_of(s, model_id: str) -> str:
    """The lineage id of the version ``model_id`` (the id itself for an unknown or unnumbered row)."""
    row = s.get(ModelRow, model_id)
    return (row.lineage_id if row is not None else None) or model_id


def versions_of(s, name: str) -> list[ModelRow]:
    """Every version of ``name``, oldest first. Raises NotFoundError when no model has that name."""
    rows = list(s.scalars(select(ModelRow).where(ModelRow.name == name).order_by(ModelRow.version)))
    if not rows:
        raise NotFoundError(f"no model is named {name!r}", "list them with `toco-fleet models list`")
    return rows


def version_ref(row: ModelRow) -> dict[str, Any]:
    """ModelVersion = model_id (the version's own id), name, version: what a device runs."""
    return {"model_id": row.id, "name": row.name, "version": row.version}


def bundle_versions(s, bundle_ids: Collection[str | None]) -> dict[str, dict[str, Any]]:
    """bundle id -> the ModelVersion it was built from, for the bundles of ``bundle_ids`` the server built
    (a bundle it does not know, say from a wiped database, is left out)."""
    if not bundle_ids:
        return {}
    rows = s.execute(select(BundleRow.id, ModelRow).join(ModelRow, ModelRow.id == BundleRow.model_id)
                     .where(BundleRow.id.in_(bundle_ids))).all()
    return {bundle_id: version_ref(model) for bundle_id, model in rows}


def running_version(s, device: DeviceRow) -> dict[str, Any] | None:
    """The ModelVersion a device runs, derived from the bundle it reported active; None if unknown."""
    bundle_id = (device.active or {}).get("bundle_id")
    return bundle_versions(s, {bundle_id}).get(bundle_id) if bundle_id else None


def group_versions(db: Database) -> list[dict[str, Any]]:
    """Versions per group: one GroupVersion (group, name, version, model_id, devices) per version a
    group's enrolled devices run, plus devices running no known version (name and version None).
    Sorted by group, then name and version."""
    bundle = DeviceRow.active_bundle
    with db.session() as s:
        # counted per (group, bundle) by the database: a fleet of 10,000 devices runs a handful of bundles
        per_bundle = s.execute(select(DeviceRow.group, bundle, func.count()).where(DeviceRow.enrollment == ENROLLED)
                               .group_by(DeviceRow.group, bundle)).all()
        known = bundle_versions(s, {b for _, b, _ in per_bundle} - {None})
    counts: Counter[tuple] = Counter()
    for group, bundle_id, n in per_bundle:
        v = known.get(bundle_id) if bundle_id else None
        counts[(group, v["name"], v["version"], v["model_id"]) if v else (group, None, None, None)] += n
    out = [{"group": g, "name": n, "version": v, "model_id": m, "devices": c} for (g, n, v, m), c in counts.items()]
    return sorted(out, key=lambda r: (r["group"], r["name"] or "", r["version"] or 0))
