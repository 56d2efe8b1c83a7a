"""Drift policy: from a device's drift reports to alerts, re-analyses with field samples, and redeploys.

Every report is judged by the server (fleet_server.drift_classify):

- *data drift* (the base model sees new data, agreement holds): an alert for the operator with
  its evidence, and no re-analysis; the operator accepts the data as normal, acknowledges, or
  re-analyses anyway (fleet_server.drift_actions);
- *fidelity drift* (the compressed model stops agreeing with the base): a re-analysis with the
  device's field samples, through the gate (fleet_server.reanalysis_gate): one open re-analysis
  per (model, group), which later triggers join as votes; a cooldown and a daily cap, under
  which the alert is ``held`` with the reason; a trigger on the bundle a re-analysis built for
  this very drift is ``escalated`` to the operator instead (convergence);
- *unclassified* (the box measured no agreement): its samples are asked for and scored
  against the base by the server (fleet_server.sample_scoring), then handled as one of the two.

A re-analysis asks its trigger devices for their disputed inputs (upload-samples) and

- ``approval`` mode: waits in ``pending_approval`` until POST /api/reanalyses/{id}/approve;
- ``auto`` mode (and after approval): waits until every trigger device uploaded samples, or
  ``samples_wait_s``, then queues an analysis whose pool = the model's pool + those samples, held to
  the budget scaled to their share of it, so that the field inputs stay within the operator's budget
  (fleet_server.field_budget).

Its bundle goes to the trigger devices first (canary, status ``canary``), and to the rest of the
group once a quorum of the group's devices triggered too, or an operator approved it
(``deployed``). Each trigger device that activated the new bundle is sent a rebase-drift
command: its drift reference then includes the field distribution the bundle was built for.
``why`` records the triggers and the decisions in words, shown by the dashboard.
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from fleet_server.db import (
    AnalysisRow,
    BundleRow,
    Database,
    DeploymentDeviceRow,
    DeploymentRow,
    DeviceRow,
    DriftAlertRow,
    ModelRow,
    ReanalysisRow,
    SampleRow,
    new_id,
)
from fleet_server.drift_alerts import (
    ACTIVE,
    active_alert,
    add_evidence,
    alert_view,
    decide,
    latest_alert,
    new_alert,
    settled,
)
from fleet_server.drift_classify import UNCLASSIFIED, Verdict, agreement_upper_bound, verdict
from fleet_server.events import EventBus
from fleet_server.field_budget import field_budget, heldout_size, operator_budget
from fleet_server.ingest import drift_point
from fleet_server.reanalysis_gate import GateSettings, group_online, held_by, open_reanalysis, quorum_needed
from fleet_server.registry import ConflictError, add_analysis_row, fetch, log_event
from fleet_server.replicas import DRIFT_POLICY, transaction_lock
from fleet_server.views import reanalysis_view
from toco_core.analysis.settings import AnalysisSettings
from toco_core.drift_kind import DATA, FIDELITY
from toco_core.messages import DriftMessage, RebaseDriftCommand, UploadSamplesCommand

log = logging.getLogger("toco.fleet.drift")
MAX_FIELD_SAMPLES = 2000
__all__ = ["DriftPolicy", "agreement_upper_bound", "disputed_evidence", "trigger_reason"]


def trigger_reason(msg: DriftMessage, budget: float, margin: float) -> str | None:
    """Why this report triggers anything (an alert, or agreement below the floor), or None."""
    v = verdict(msg, budget, margin)
    return None if v is None else v.why


def disputed_evidence(msg: DriftMessage) -> list[dict[str, Any]]:
    """What an alert keeps of a report's disputed samples for the scorer (fleet_server.sample_scoring):
    ref, class and confidence, and the served output where the box sent one (a model without classes)."""
    return [{"ref": d.ref, "model_class": d.model_class, "confidence": d.confidence,
             **({} if d.output is None else {"output": d.output})} for d in msg.disputed]


class DriftPolicy:
    """Turns drift reports into alerts and re-analyses, and finished re-analyses into deployments."""

    def __init__(self, db: Database, events: EventBus, *, mode: str, budget: float, samples_wait_s: float,
                 send_command, deployments, jobs=None, canary_share: float = 0.1, failure_threshold: float = 0.2,
                 agreement_margin: float = 0.05, gate: GateSettings | None = None, scorer=None) -> None:
        """``scorer``: classifies an unshadowed box's alert from its samples (fleet_server.sample_scoring)."""
        self.db, self.events = db, events
        self.mode, self.budget, self.samples_wait_s = mode, budget, samples_wait_s
        self.send_command, self.deployments, self.jobs = send_command, deployments, jobs
        self.canary_share, self.failure_threshold = canary_share, failure_threshold
        self.agreement_margin = agreement_margin
        self.gate = gate or GateSettings()
        self.scorer = scorer

    # ------------------------------------------------------------------ reports
    def on_drift(self, s, device: DeviceRow, msg: DriftMessage, after: list) -> None:
        """Ingest hook: record, classify and act on one report of an enrolled device."""
        v = verdict(msg, self.budget, self.agreement_margin)
        if v is None:
            self._in_band(s, device, msg, after)
            return
        if not msg.bundle_id:
            return
        bundle = s.get(BundleRow, msg.bundle_id)
        if bundle is None:
            log.warning("drift on a bundle this server did not build", extra={"fields": {"device": device.id}})
            return
        alert = active_alert(s, device.id, msg.bundle_id)
        if alert is not None:  # the alert holds: more evidence, no new decision
            add_evidence(alert, drift_point(msg))
            device.drift_kind = alert.kind
            return
        last = latest_alert(s, device.id, msg.bundle_id)
        if last is not None and settled(last, v.kind, msg.opened_at):  # the operator decided already: no new alert
            add_evidence(last, drift_point(msg))
            return
        if v.kind == FIDELITY and any(r.trigger_bundles.get(device.id) == msg.bundle_id for r in s.scalars(
                select(ReanalysisRow).where(ReanalysisRow.model_id == bundle.model_id))):
            return  # a device triggers at most one re-analysis per bundle it runs
        alert = new_alert(s, device, model_id=bundle.model_id, bundle_id=msg.bundle_id, kind=v.kind, why=v.why,
                          point=drift_point(msg))
        alert.evidence = {**(alert.evidence or {}), "disputed": disputed_evidence(msg)}
        refs = [d.ref for d in msg.disputed] or None
        if v.kind == DATA:
            decide(alert, "open", "data drift: the base model sees new data; no automatic re-analysis (accept it as "
                                  "normal, acknowledge, re-analyse anyway, or register a retrained model version)")
        elif v.kind == UNCLASSIFIED:
            decide(alert, "classifying", "no agreement measured on the box: its samples are scored against the base")
            self._ask_samples(device.id, msg.window_index, refs, after)
        else:
            self._fidelity(s, device, bundle, msg.window_index, refs, alert, v, after)
        log_event(s, "drift_alert", {"alert_id": alert.id, "device_id": device.id, "kind": alert.kind,
                                     "status": alert.status, "decision": alert.decision})
        view = alert_view(alert)
        after.append(lambda: self.events.publish("drift_alert", view))

    def _in_band(self, s, device: DeviceRow, msg: DriftMessage, after: list) -> None:
        """A window that triggers nothing: the device's waiting alerts on this bundle are over."""
        device.drift_kind = None if not msg.alert else device.drift_kind
        for a in s.scalars(select(DriftAlertRow).where(DriftAlertRow.device_id == device.id,
                                                       DriftAlertRow.status.in_(("open", "held")))):
            decide(a, "resolved", f"{a.decision}; back in band at window {msg.window_index}".lstrip("; "))
            view = alert_view(a)
            after.append(lambda view=view: self.events.publish("drift_alert", view))

    def _ask_samples(self, device_id: str, window: int, refs: list[str] | None, after: list) -> None:
        cmd = UploadSamplesCommand(cmd_id=new_id("c"), window=window, refs=refs)
        after.append(lambda: self.send_command(device_id, cmd))

    def _fidelity(self, s, device: DeviceRow, bundle: BundleRow, window: int, refs: list[str] | None,
                  alert: DriftAlertRow, v: Verdict, after: list, operator: bool = False) -> None:
        """Start, join, hold or escalate a re-analysis for a fidelity alert (``operator``: skip cooldown and cap)."""
        built_for = s.scalars(select(ReanalysisRow).where(ReanalysisRow.analysis_id == bundle.analysis_id)).first()
        if built_for is not None and not operator:
            decide(alert, "escalated", f"fidelity drift again on the bundle re-analysis {built_for.id} built for "
                                       "this drift: escalated to the operator instead of re-analysing again")
            return
        r = open_reanalysis(s, bundle.model_id, device.group)
        if r is None:
            held = None if operator else held_by(s, bundle.model_id, device.group, self.gate)
            if held is not None:
                decide(alert, "held", f"{held}: no re-analysis started (re-analyse anyway to override)")
                log_event(s, "reanalysis_skipped", {"alert_id": alert.id, "device_id": device.id, "why": held})
                return
            r = ReanalysisRow(id=new_id("r"), model_id=bundle.model_id, parent_analysis_id=bundle.analysis_id,
                              group=device.group, trigger_devices=[], trigger_bundles={}, why="",
                              status="pending_approval" if self.mode == "approval" else "queued",
                              created_at=time.time())
            s.add(r)
            verb = "started"
        else:
            verb = "joined"
        if device.id not in r.trigger_devices:
            r.trigger_devices = [*r.trigger_devices, device.id]
            r.trigger_bundles = {**r.trigger_bundles, device.id: bundle.id}
            who = "operator: re-analyse anyway" if operator else v.why
            r.why = (r.why + "; " if r.why else "") + f"{device.id}: {who} (window {window})"
        needed = quorum_needed(len(group_online(s, device.group)), self.gate)
        decide(alert, "reanalysing", f"{verb} re-analysis {r.id} ({len(r.trigger_devices)} of the {needed} devices "
                                     f"of group {device.group!r} a group redeploy needs)")
        alert.reanalysis_id = r.id
        log_event(s, "reanalysis", {"reanalysis_id": r.id, "device_id": device.id, "why": v.why})
        if r.analysis_id is None:  # its analysis has not started: the device's field samples join it
            self._ask_samples(device.id, window, refs, after)
        view = reanalysis_view(r)
        after.append(lambda: self.events.publish("reanalysis", view))

    def start_for_alert(self, s, alert: DriftAlertRow, after: list, why: str) -> None:
        """Operator: re-analyse for this alert whatever its kind, cooldown or daily cap (drift_actions)."""
        device, bundle = s.get(DeviceRow, alert.device_id), s.get(BundleRow, alert.bundle_id or "")
        if device is None or bundle is None:
            raise ConflictError(f"alert {alert.id!r} names no known device or bundle any more", "nothing to re-analyse")
        window = ((alert.evidence or {}).get("windows") or [{}])[-1].get("window") or 0
        self._fidelity(s, device, bundle, window, None, alert, Verdict(alert.kind, why), after, operator=True)

    def classified(self, s, alert: DriftAlertRow, v: Verdict, after: list) -> None:
        """The scorer's verdict on an unclassified alert: handle it as data or fidelity drift."""
        alert.kind, alert.why = v.kind, f"{alert.why}; {v.why}"
        device, bundle = s.get(DeviceRow, alert.device_id), s.get(BundleRow, alert.bundle_id or "")
        if device is not None:
            device.drift_kind = v.kind
        if v.kind == FIDELITY and device is not None and bundle is not None:
            window = ((alert.evidence or {}).get("windows") or [{}])[-1].get("window") or 0
            self._fidelity(s, device, bundle, window, None, alert, v, after)
        else:
            decide(alert, "open", "data drift (scored on the server): no automatic re-analysis")
        view = alert_view(alert)
        after.append(lambda: self.events.publish("drift_alert", view))

    # ------------------------------------------------------------------ re-analyses
    def list(self) -> list[dict[str, Any]]:
        """Every re-analysis, newest first, with its quorum: ``votes`` of ``needed`` group devices."""
        with self.db.session() as s:
            rows = s.scalars(select(ReanalysisRow).order_by(ReanalysisRow.created_at.desc())).all()
            return [self._view(s, r) for r in rows]

    def _view(self, s, r: ReanalysisRow) -> dict[str, Any]:
        online = group_online(s, r.group)
        return {**reanalysis_view(r), "quorum": {"votes": len(r.trigger_devices), "online": len(online),
                                                 "needed": quorum_needed(len(online), self.gate)}}

    def approve(self, *, reanalysis_id: str) -> dict[str, Any]:
        """Approve a pending re-analysis (queued at the next tick), or, once its canary is deployed, the group
        redeploy without a quorum. Raises NotFoundError / ConflictError."""
        with self.db.session(write=True) as s:
            transaction_lock(s, DRIFT_POLICY)  # replicas: one at a time (fleet_server.replicas)
            r = fetch(s, ReanalysisRow, reanalysis_id, "reanalysis")
            if r.status == "pending_approval":
                r.status, r.approved_at = "queued", time.time()
            elif r.status == "canary" and r.group_approved_at is None:
                r.group_approved_at = time.time()
            else:
                raise ConflictError(f"reanalysis {reanalysis_id!r} is {r.status}, not waiting for approval",
                                    "see GET /api/reanalyses")
            log_event(s, "reanalysis", {"reanalysis_id": r.id, "status": r.status, "approved": True})
            view = self._view(s, r)
        self.events.publish("reanalysis", view)
        return view

    def tick(self, now: float | None = None) -> None:
        """Queue analyses whose samples are in; follow running ones; move canaries to their group; rebase
        the devices that activated a re-analysis's bundle; score unshadowed boxes' samples."""
        now = time.time() if now is None else now
        changed: builtins.list[ReanalysisRow] = []
        group_deploys: builtins.list[tuple[str, Any, str]] = []
        after: builtins.list[Callable[[], None]] = []
        with self.db.session(write=True) as s:
            transaction_lock(s, DRIFT_POLICY)  # replicas: one at a time (fleet_server.replicas)
            for r in s.scalars(select(ReanalysisRow).where(ReanalysisRow.status.in_(("queued", "running")))):
                if r.analysis_id is None:
                    if self._ready(s, r, now):
                        self._queue_analysis(s, r)
                        changed.append(r)
                elif r.status == "queued" and fetch(s, AnalysisRow, r.analysis_id, "analysis").status == "running":
                    r.status = "running"
                    changed.append(r)
            for r in s.scalars(select(ReanalysisRow).where(ReanalysisRow.status.in_(("canary", "deployed")))):
                self._rebase_converged(s, r, after)
                if r.status == "canary" and self._group_due(s, r, changed):
                    group_deploys.append((r.id, r.analysis_id, r.group))
            if self.scorer is not None:
                self.scorer.tick(s, self, now, after)
            views = [self._view(s, r) for r in changed]
        for fn in after:
            fn()
        for view in views:
            self.events.publish("reanalysis", view)
        for rid, analysis_id, group in group_deploys:
            self._deploy_group(rid, analysis_id, group)
        if changed and self.jobs is not None:
            self.jobs.kick()

    def _ready(self, s, r: ReanalysisRow, now: float) -> bool:
        since = max(r.created_at, r.approved_at or 0.0)
        if now - since >= self.samples_wait_s:
            return True
        have = set(s.scalars(select(SampleRow.device_id).where(SampleRow.device_id.in_(r.trigger_devices),
                                                               SampleRow.t >= r.created_at - 60)))
        return have >= set(r.trigger_devices)

    def _queue_analysis(self, s, r: ReanalysisRow) -> None:
        parent = s.get(AnalysisRow, r.parent_analysis_id)
        ids = list(s.scalars(select(SampleRow.id).where(SampleRow.device_id.in_(r.trigger_devices),
                                                        SampleRow.t >= parent.created_at)
                             .order_by(SampleRow.id.desc()).limit(MAX_FIELD_SAMPLES)))
        # the field samples are a minority of the pool: held to the operator's budget they could flip far more
        # than it, on the very inputs the trigger devices now see (fleet_server.field_budget)
        budget = operator_budget(s, parent)
        pool = s.get(ModelRow, r.model_id).pool_size
        parent_settings = AnalysisSettings.model_validate(parent.settings)
        held = field_budget(budget, pool, len(ids), heldout_size(parent_settings, pool + len(ids)))
        settings = parent_settings.model_copy(update={"budget": held})
        row = add_analysis_row(s, model_id=r.model_id, settings=settings,
                               reason=f"drift: {', '.join(r.trigger_devices)}", field_sample_ids=ids)
        r.analysis_id = row.id
        r.why += f" -> re-analysis with {len(ids)} field samples"
        if held < budget:
            r.why += f" (budget {held:.2%} on the pool: {budget:.1%} on the field samples)"

    def _group_due(self, s, r: ReanalysisRow, changed: builtins.list[ReanalysisRow]) -> bool:
        """Whether a deployed canary's group redeploy may start now (quorum or approval); marks the
        re-analysis deployed when its canary already covers the group, failed when the canary stopped."""
        dep = s.get(DeploymentRow, r.deployment_id or "")
        if dep is None or dep.stage in ("canary", "rest"):
            return False
        if dep.stage != "done":
            r.status = "failed"
            r.why += f" -> canary {dep.stage}: the group keeps its bundle"
            changed.append(r)
            return False
        canary = set(s.scalars(select(DeploymentDeviceRow.device_id)
                               .where(DeploymentDeviceRow.deployment_id == dep.id)))
        online = group_online(s, r.group)
        if not set(online) - canary:
            r.status = "deployed"
            changed.append(r)
            return False
        return len(r.trigger_devices) >= quorum_needed(len(online), self.gate) or r.group_approved_at is not None

    def _deploy_group(self, rid: str, analysis_id: str, group: str) -> None:
        dep_id, why = None, ""
        try:
            dep = self.deployments.create(analysis_id=analysis_id, target={"group": group},
                                          canary_share=self.canary_share, failure_threshold=self.failure_threshold,
                                          reason=f"group redeploy after drift re-analysis {rid}")
            dep_id, why = dep["deployment_id"], f" -> group {group!r} redeployed"
        except Exception as exc:
            log.warning("group redeploy after re-analysis failed", extra={"fields": {"reanalysis": rid,
                                                                                     "error": str(exc)}})
            why = f" -> group redeploy failed: {exc}"
        with self.db.session(write=True) as s:
            transaction_lock(s, DRIFT_POLICY)  # replicas: one at a time (fleet_server.replicas)
            r = fetch(s, ReanalysisRow, rid, "re-analysis")
            r.status, r.group_deployment_id, r.why = ("deployed" if dep_id else "failed"), dep_id, r.why + why
            log_event(s, "reanalysis", {"reanalysis_id": rid, "status": r.status, "group_deployment_id": dep_id})
            view = self._view(s, r)
        self.events.publish("reanalysis", view)

    def _rebase_converged(self, s, r: ReanalysisRow, after: builtins.list[Callable[..., Any]]) -> None:
        """Send each trigger device that activated the re-analysis's bundle one rebase-drift command."""
        done = set(r.rebased or [])
        deps = [d for d in (r.deployment_id, r.group_deployment_id) if d]
        active = set(s.scalars(select(DeploymentDeviceRow.device_id).where(
            DeploymentDeviceRow.deployment_id.in_(deps), DeploymentDeviceRow.outcome == "succeeded")))
        due = sorted((active & set(r.trigger_devices)) - done)
        for device_id in due:
            cmd = RebaseDriftCommand(cmd_id=new_id("c"), reason="converged")
            after.append(lambda device_id=device_id, cmd=cmd: self.send_command(device_id, cmd))
            for a in s.scalars(select(DriftAlertRow).where(DriftAlertRow.device_id == device_id,
                                                           DriftAlertRow.reanalysis_id == r.id,
                                                           DriftAlertRow.status.in_(ACTIVE))):
                decide(a, "resolved", f"{a.decision}; converged: the re-analysis's bundle is active and the drift "
                                      "reference now includes the field windows")
            dev = s.get(DeviceRow, device_id)
            if dev is not None:
                dev.drift_kind = None
        if due:
            r.rebased = sorted(done | set(due))

    def on_analysis_done(self, analysis_id: str) -> None:
        """JobRunner hook: deploy a finished re-analysis to its trigger devices (canary), or mark it failed."""
        with self.db.session() as s:
            r = s.scalars(select(ReanalysisRow).where(ReanalysisRow.analysis_id == analysis_id)).first()
            if r is None:
                return
            status, rid, devices = fetch(s, AnalysisRow, analysis_id, "analysis").status, r.id, list(r.trigger_devices)
        dep_id, new_status = None, "failed"
        if status == "done":
            try:
                dep = self.deployments.create(analysis_id=analysis_id, target={"devices": devices},
                                              canary_share=1.0, failure_threshold=self.failure_threshold,
                                              reason=f"canary after drift re-analysis {rid}: its trigger devices")
                dep_id, new_status = dep["deployment_id"], "canary"
            except Exception as exc:
                log.warning("redeploy after re-analysis failed",
                            extra={"fields": {"reanalysis": rid, "error": str(exc)}})
        with self.db.session(write=True) as s:
            transaction_lock(s, DRIFT_POLICY)  # replicas: one at a time (fleet_server.replicas)
            r = fetch(s, ReanalysisRow, rid, "re-analysis")
            r.status, r.deployment_id = new_status, dep_id
            log_event(s, "reanalysis", {"reanalysis_id": rid, "status": new_status, "deployment_id": dep_id})
            view = self._view(s, r)
        self.events.publish("reanalysis", view)
