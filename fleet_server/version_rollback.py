"""Rolling a group back to the previous model version in one step, through the normal staged deployment.

The version the group runs is derived from its devices' active bundles (fleet_server.model_versions);
the target is that version's parent, and the bundle is the parent's newest one. Its signed sequence
is below the one the devices took for the newer version, so a deploy command would be refused as a
downgrade: the deployment sends signed rollback commands naming the bundle instead (the agents'
one way to admit an older bundle), in the same canary-then-rest waves with the same failure threshold.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from fleet_server.db import BundleRow, Database, DeviceRow, ModelRow
from fleet_server.enrollment import ENROLLED
from fleet_server.model_versions import bundle_versions, versions_of
from fleet_server.registry import ConflictError


def rollback_target(db: Database, *, name: str, group: str) -> tuple[dict[str, Any], ModelRow, BundleRow]:
    """(the version ``group`` runs now, the version to go back to, that version's newest bundle).

    "Runs now" is the newest version of ``name`` among the group's enrolled devices. Raises
    NotFoundError for an unknown name; ConflictError when no device of the group runs a version of
    it, when that version is v1 (nothing before it), or when the previous version has no bundle yet.
    """
    with db.session() as s:
        versions = {v.id: v for v in versions_of(s, name)}
        actives = s.scalars(select(DeviceRow.active).where(DeviceRow.group == group,
                                                           DeviceRow.enrollment == ENROLLED)).all()
        running = bundle_versions(s, {(a or {}).get("bundle_id") for a in actives} - {None})
        mine = [v for v in running.values() if v["model_id"] in versions]
        if not mine:
            raise ConflictError(f"no device of group {group!r} runs a version of model {name!r}",
                                "deploy a version first; see `toco-fleet devices list`")
        current = max(mine, key=lambda v: v["version"])
        parent_id = versions[current["model_id"]].parent_id
        if parent_id is None or parent_id not in versions:
            raise ConflictError(f"group {group!r} runs {name} v{current['version']}, which has no previous version",
                                "there is nothing to roll back to")
        previous = versions[parent_id]
        bundle = s.scalars(select(BundleRow).where(BundleRow.model_id == parent_id)
                           .order_by(BundleRow.created_at.desc()).limit(1)).first()
        if bundle is None:
            raise ConflictError(f"{name} v{previous.version} has no bundle to roll back to",
                                f"analyse it first: `toco-fleet analyze {previous.id}`")
    return current, previous, bundle


def rollback_group(db: Database, deployments, *, name: str, group: str, canary_share: float,
                   failure_threshold: float) -> dict[str, Any]:
    """Start the staged rollback of ``group`` from the version it runs to the previous one of ``name``.

    ``deployments`` is the server's Deployments. Returns the Deployment (``command``: rollback) with
    ``from_version`` and ``to_version`` (ModelVersions). Raises what rollback_target and
    Deployments.create raise (NotFoundError, ConflictError).
    """
    current, previous, bundle = rollback_target(db, name=name, group=group)
    reason = f"rollback of group {group} from {name} v{current['version']} to v{previous.version}"
    view = deployments.create(analysis_id=bundle.analysis_id, target={"group": group}, canary_share=canary_share,
                              failure_threshold=failure_threshold, reason=reason, command="rollback")
    return {**view, "from_version": current,
            "to_version": {"model_id": previous.id, "name": previous.name, "version": previous.version}}
