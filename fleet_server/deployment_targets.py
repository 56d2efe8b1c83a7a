"""Which devices a new deployment targets, and which of them the solver is expected to find no plan for."""

from __future__ import annotations

import logging

from sqlalchemy import select

from fleet_server.db import DeviceRow
from fleet_server.enrollment import ENROLLED
from fleet_server.enrollment import may_run as may_run_model
from fleet_server.model_versions import lineage_of
from fleet_server.registry import ConflictError, NotFoundError, fetch
from fleet_server.whatif import expected_infeasible
from toco_core.errors import TocoError

log = logging.getLogger("toco.fleet.deployments")


def choose_targets(s, target: dict, model_id: str) -> list[str]:
    """The device ids a deployment of ``model_id`` goes to: ``{"device": id}``, ``{"devices": [ids]}`` (a drift
    re-analysis's canary, its online ones), ``{"group": name}`` or ``{}`` (the whole fleet), online ones for a
    group or the fleet. Only enrolled devices allowed the model count: a quarantined or revoked one is never
    sent a command.

    Takes the session, the target and the model's id. Returns the ids (unsorted). Raises NotFoundError for
    an unknown device or a group with no such device, ConflictError when no targeted device qualifies.
    """
    # allowing a model's v1 id (its lineage id) allows every version of it; a later version's id, that one only
    lineage = lineage_of(s, model_id)

    def may_run(d: DeviceRow, model_id: str) -> bool:
        return may_run_model(d, model_id) or may_run_model(d, lineage)

    if target.get("device"):
        d = fetch(s, DeviceRow, target["device"], "device")
        if not may_run(d, model_id):
            why = (f"is {d.enrollment}" if d.enrollment != ENROLLED else f"is not allowed model {model_id!r}")
            raise ConflictError(f"device {d.id!r} {why}", "enroll it with `toco-fleet devices enroll`")
        return [d.id]
    if target.get("devices"):  # a drift re-analysis's canary: its trigger devices (fleet_server.drift_policy)
        found = {d.id: d for d in s.scalars(select(DeviceRow).where(DeviceRow.id.in_(target["devices"])))}
        missing = [dev for dev in target["devices"] if dev not in found]
        if missing:
            fetch(s, DeviceRow, missing[0], "device")  # raises the NotFoundError naming the first one missing
        rows = [found[dev] for dev in target["devices"]]
        ids = [d.id for d in rows if d.online and may_run(d, model_id)]
        if not ids:
            raise ConflictError(f"none of the devices {target['devices']} is online, enrolled and allowed "
                                f"model {model_id!r}", "check GET /api/devices")
        return ids
    q = select(DeviceRow).where(DeviceRow.online.is_(True), DeviceRow.enrollment == ENROLLED)
    if target.get("group"):
        ids = [d.id for d in s.scalars(q.where(DeviceRow.group == target["group"])) if may_run(d, model_id)]
        if not ids:
            raise NotFoundError(f"group {target['group']!r} has no online enrolled devices allowed this model",
                                "check GET /api/devices")
        return ids
    ids = [d.id for d in s.scalars(q) if may_run(d, model_id)]
    if not ids:
        raise ConflictError("no enrolled device allowed this model is online",
                            "start an agent, and enroll it with `toco-fleet devices enroll`")
    return ids


def infeasible_warnings(paths: dict[str, str | None], hardware: dict[str, dict], budget: float) -> list[dict]:
    """The advisory per-device check (fleet_server.whatif.expected_infeasible), never a refusal: the box
    decides with its own numbers, but whoever deploys hears it first.

    Takes the analysis' ``result_dir`` and ``model_path``, each target's hardware and the budget. Returns
    ``[{"device_id", "reason"}, ...]``; a check that cannot run (analysis files gone) is logged and returns [].
    """
    if not paths["result_dir"]:
        return []
    try:
        return expected_infeasible(result_dir=paths["result_dir"], model_path=paths["model_path"] or "",
                                   hardware=hardware,
                                   budget=budget)
    except (TocoError, OSError) as exc:
        log.warning("no feasibility check for this deployment", extra={"fields": {"error": str(exc)}})
        return []
