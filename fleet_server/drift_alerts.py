"""Drift alert records: one per device and bundle while it is active, with its kind, its evidence
(the windows that raised it) and what the server decided about it and why.

Statuses: ``open`` (data drift waiting for an operator), ``classifying`` (an unshadowed box's
samples are being scored), ``reanalysing`` (part of a re-analysis), ``held`` (a re-analysis was
not started: cooldown or daily cap), ``escalated`` (fidelity drift again on the bundle built for
it); then ``accepted`` (the new data is normal: the reference was rebased), ``acknowledged``,
``resolved`` (back in band, or converged after the redeploy).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from fleet_server.db import DeviceRow, DriftAlertRow, new_id

ACTIVE = ("open", "classifying", "reanalysing", "held", "escalated")
MAX_EVIDENCE_WINDOWS = 10
NEW_VERSION_HINT = "toco-fleet models add MODEL.onnx --pool POOL.npz --name NAME"  # the model-versions hook


def active_alert(s, device_id: str, bundle_id: str | None) -> DriftAlertRow | None:
    """The device's active alert on ``bundle_id``, if any."""
    return s.scalars(select(DriftAlertRow).where(DriftAlertRow.device_id == device_id,
                                                 DriftAlertRow.bundle_id == bundle_id,
                                                 DriftAlertRow.status.in_(ACTIVE))).first()


def latest_alert(s, device_id: str, bundle_id: str | None) -> DriftAlertRow | None:
    """The device's newest alert on ``bundle_id``, whatever its status."""
    return s.scalars(select(DriftAlertRow).where(DriftAlertRow.device_id == device_id,
                                                 DriftAlertRow.bundle_id == bundle_id)
                     .order_by(DriftAlertRow.created_at.desc())).first()


def settled(alert: DriftAlertRow | None, kind: str, opened_at: float) -> bool:
    """Whether an operator's decision already covers a new alerting window: the alert was acknowledged
    (same kind, same bundle: the box keeps alerting on what the operator saw), or accepted after the
    window opened (the window was judged against the reference the box has since rebased away from).
    Compares the box's clock with the server's: a box far off loses the second rule, not the first."""
    if alert is None:
        return False
    return (alert.status == "acknowledged" and alert.kind == kind) or (
        alert.status == "accepted" and opened_at < alert.updated_at)


def device_alerts(s, device_id: str, active_only: bool = True) -> list[DriftAlertRow]:
    """The device's alerts, newest first (only the active ones by default)."""
    q = select(DriftAlertRow).where(DriftAlertRow.device_id == device_id)
    if active_only:
        q = q.where(DriftAlertRow.status.in_(ACTIVE))
    return list(s.scalars(q.order_by(DriftAlertRow.created_at.desc())))


def new_alert(s, device: DeviceRow, *, model_id: str | None, bundle_id: str | None, kind: str, why: str,
              point: dict[str, Any]) -> DriftAlertRow:
    """Record a new alert of ``device`` (its enrolled group) with its first window as evidence."""
    now = time.time()
    row = DriftAlertRow(id=new_id("a"), device_id=device.id, model_id=model_id, group=device.group,
                        bundle_id=bundle_id, kind=kind, status="open", why=why, decision="",
                        evidence={"windows": [point]}, created_at=now, updated_at=now)
    s.add(row)
    device.drift_kind = kind
    return row


def add_evidence(alert: DriftAlertRow, point: dict[str, Any]) -> None:
    """Append a later window to the alert's evidence (the last MAX_EVIDENCE_WINDOWS are kept)."""
    windows = [*(alert.evidence or {}).get("windows", []), point][-MAX_EVIDENCE_WINDOWS:]
    alert.evidence = {**(alert.evidence or {}), "windows": windows}
    alert.updated_at = time.time()


def decide(alert: DriftAlertRow, status: str, decision: str) -> None:
    """Set what the server (or an operator) decided, and why."""
    alert.status, alert.decision, alert.updated_at = status, decision, time.time()


def actions(alert: DriftAlertRow) -> list[str]:
    """What an operator can do with the alert now: accept (as normal), acknowledge, reanalyse."""
    if alert.status not in ACTIVE:
        return []
    out = ["accept", "acknowledge"]
    if alert.status != "reanalysing":
        out.append("reanalyse")
    return out


def alert_view(a: DriftAlertRow) -> dict[str, Any]:
    """DriftAlert = id, device, model, group, bundle, kind, status, why, decision, evidence, actions."""
    return {"alert_id": a.id, "device_id": a.device_id, "model_id": a.model_id, "group": a.group,
            "bundle_id": a.bundle_id, "kind": a.kind, "status": a.status, "why": a.why, "decision": a.decision,
            "evidence": a.evidence or {}, "reanalysis_id": a.reanalysis_id, "actions": actions(a),
            "new_version": NEW_VERSION_HINT, "created_at": a.created_at, "updated_at": a.updated_at}
