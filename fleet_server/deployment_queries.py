"""Reading deployments: one with its members, all of them, and one device's deployment timeline."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from fleet_server.db import Database, DeploymentDeviceRow, DeploymentRow, TimelineRow
from fleet_server.registry import fetch
from fleet_server.views import deployment_view


def deployment_members(s, deployment_id: str) -> list[DeploymentDeviceRow]:
    """A deployment's member rows, by device id (in the caller's session, so they can be changed)."""
    return list(s.scalars(select(DeploymentDeviceRow).where(DeploymentDeviceRow.deployment_id == deployment_id)
                          .order_by(DeploymentDeviceRow.device_id)))


def get_deployment(db: Database, deployment_id: str) -> dict[str, Any]:
    """One Deployment with its devices (fleet_server.views.deployment_view). Raises NotFoundError."""
    with db.session() as s:
        dep = fetch(s, DeploymentRow, deployment_id, "deployment")
        return deployment_view(dep, deployment_members(s, deployment_id))


def list_deployments(db: Database) -> list[dict[str, Any]]:
    """Every Deployment with its devices, newest first."""
    with db.session() as s:
        deps = s.scalars(select(DeploymentRow).order_by(DeploymentRow.created_at.desc())).all()
        return [deployment_view(d, deployment_members(s, d.id)) for d in deps]


def device_history(db: Database, *, device_id: str, limit: int = 200) -> list[dict[str, Any]]:
    """A device's deployment timeline, newest first: deployment_id, bundle_id, phase, reason, t."""
    with db.session() as s:
        rows = s.execute(select(TimelineRow, DeploymentRow.bundle_id)
                         .join(DeploymentRow, DeploymentRow.id == TimelineRow.deployment_id)
                         .where(TimelineRow.device_id == device_id).order_by(TimelineRow.id.desc()).limit(limit)).all()
        return [{"deployment_id": t.deployment_id, "bundle_id": b, "phase": t.phase, "reason": t.reason, "t": t.t}
                for t, b in rows]
