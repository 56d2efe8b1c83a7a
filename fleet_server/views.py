"""Rows to the JSON objects of the HTTP API contract (docs in /api/docs and the dashboard's view of them)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson
from pydantic import ValidationError

from fleet_server.db import AnalysisRow, DeploymentDeviceRow, DeploymentRow, DeviceRow, ModelRow, ReanalysisRow
from toco_core.messages import PlanSummary

OUTCOMES = ("pending", "in_progress", "succeeded", "failed")
PROFILE_KEYS = ("total_memory", "available_memory", "physical_cores", "cpu_model")


def model_view(m: ModelRow) -> dict[str, Any]:
    """Model = model_id, name, version, parent_id (the previous version's model_id), lineage_id (v1's),
    sha256, weights, size_bytes, pool_size, created_at, preprocessing. One row per version."""
    return {"model_id": m.id, "name": m.name, "version": m.version, "parent_id": m.parent_id,
            "lineage_id": m.lineage_id or m.id, "sha256": m.sha256, "weights": m.weights, "size_bytes": m.size_bytes,
            "pool_size": m.pool_size, "created_at": m.created_at, "preprocessing": m.preprocessing}


def analysis_view(a: AnalysisRow) -> dict[str, Any]:
    """Analysis = status, progress {phase, done, total}, reason, error, bundle_id, timestamps."""
    return {"analysis_id": a.id, "model_id": a.model_id, "status": a.status,
            "progress": {"phase": a.phase, "done": a.done, "total": a.total}, "reason": a.reason,
            "error": a.error, "bundle_id": a.bundle_id, "created_at": a.created_at, "started_at": a.started_at,
            "finished_at": a.finished_at, "field_samples": len(a.field_sample_ids or []),
            "budget": (a.settings or {}).get("budget")}


def device_state(d: DeviceRow) -> str:
    """revoked | quarantined | offline | deploying | alert | failed | online, in that precedence."""
    if d.enrollment in ("revoked", "quarantined"):
        return d.enrollment
    if not d.online:
        return "offline"
    if d.deploy_state == "deploying":
        return "deploying"
    if d.alert:
        return "alert"
    if d.deploy_state == "failed":
        return "failed"
    return "online"


def stored_plan(plan: dict | None) -> PlanSummary | None:
    """The PlanSummary of a stored ``active.plan``; None when there is none or it does not validate
    (a row written before the plan was typed, with keys no agent sends any more)."""
    if not plan:
        return None
    return _plan_of_json(orjson.dumps(plan))


# The overview validates every device's plan on every poll: ~15 us each against ~1 us for the
# JSON key. A plan changes only with a deployment, so validated plans are kept by their JSON
# (PlanSummary is frozen, so sharing one is safe); the size covers a whole overview of a large
# fleet (an LRU smaller than one sweep would never hit).
@lru_cache(maxsize=8192)
def _plan_of_json(raw: bytes) -> PlanSummary | None:
    try:
        return PlanSummary.model_validate_json(raw)
    except ValidationError:
        return None


def _agreement(disagreement: float | None) -> float | None:
    return None if disagreement is None else 1.0 - disagreement


def active_view(active: dict | None) -> dict[str, Any] | None:
    """The contract's ``active`` block from what the device reported (state or final status).

    The agreements come from the plan's disagreements, which always belong to the plan shown;
    the agreements a final status carried are the fallback for a plan without them.
    """
    if not active or not active.get("bundle_id"):
        return None
    plan = stored_plan(active.get("plan"))
    # the box's storage as it reported it on activation (absent before boxes sent it)
    storage = {k: active.get(k) for k in ("download_bytes", "state_dir_bytes", "shadow")}
    if plan is None:
        return {"bundle_id": active["bundle_id"], "model_name": active.get("model_name"), "plan_label": None,
                "storage_bytes": None, "base_file_bytes": None,
                "predicted_agreement": active.get("predicted_agreement"),
                "measured_agreement": active.get("measured_agreement"), "plan": None, **storage}
    predicted, measured = _agreement(plan.predicted_disagreement), _agreement(plan.measured_disagreement)
    return {"bundle_id": active["bundle_id"], "model_name": active.get("model_name") or plan.model_name,
            "plan_label": plan.label, "storage_bytes": plan.storage_bytes, "base_file_bytes": plan.base_file_bytes,
            "predicted_agreement": predicted if predicted is not None else active.get("predicted_agreement"),
            "measured_agreement": measured if measured is not None else active.get("measured_agreement"),
            "plan": plan.model_dump(mode="json"), **storage}


def device_view(d: DeviceRow) -> dict[str, Any]:
    """Device = id, group, online, last_seen, agent_version, hardware, active, last_drift, alert, state,
    enrollment (enrolled | quarantined | revoked), enrolled_at, allowed_models.

    ``hardware`` is the stored HardwareInfo JSON, passed through unparsed (the overview's hot path).
    """
    return {"device_id": d.id, "group": d.group, "online": d.online, "last_seen": d.last_seen,
            "agent_version": d.agent_version, "hardware": d.hardware or {}, "active": active_view(d.active),
            "last_drift": d.last_drift, "alert": d.alert, "state": device_state(d), "birth": d.birth,
            "enrollment": d.enrollment, "enrolled_at": d.enrolled_at, "allowed_models": d.allowed_models,
            "drift_kind": d.drift_kind}


def deployment_view(dep: DeploymentRow, members: list[DeploymentDeviceRow]) -> dict[str, Any]:
    """Deployment with its command (deploy | rollback), counts per outcome, every device's current
    phase, and the devices the server
    expected to find no plan within budget (``expected_infeasible``: device_id, reason)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for m in members:
        counts[m.outcome] += 1
    return {"deployment_id": dep.id, "analysis_id": dep.analysis_id, "bundle_id": dep.bundle_id, "target": dep.target,
            "stage": dep.stage, "command": dep.command or "deploy", "counts": counts, "canary_share": dep.canary_share,
            "failure_threshold": dep.failure_threshold, "reason": dep.reason,
            "devices": [{"device_id": m.device_id, "phase": m.phase, "outcome": m.outcome, "wave": m.wave,
                         "reason": m.reason, "expected_infeasible": m.expected_infeasible, "t": m.updated_at}
                        for m in members],
            "expected_infeasible": [{"device_id": m.device_id, "reason": m.expected_infeasible}
                                    for m in members if m.expected_infeasible],
            "created_at": dep.created_at, "finished_at": dep.finished_at}


def reanalysis_view(r: ReanalysisRow) -> dict[str, Any]:
    """Reanalysis = trigger devices, why, status, the analysis, its canary deployment (``deployment_id``, to the
    trigger devices) and its group deployment."""
    return {"reanalysis_id": r.id, "model_id": r.model_id, "group": r.group, "trigger_devices": r.trigger_devices,
            "why": r.why, "status": r.status, "analysis_id": r.analysis_id, "deployment_id": r.deployment_id,
            "group_deployment_id": r.group_deployment_id, "group_approved_at": r.group_approved_at,
            "rebased": r.rebased or [], "created_at": r.created_at, "approved_at": r.approved_at}
