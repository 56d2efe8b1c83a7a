"""Drift policy: from a device's drift reports to a re-analysis with its field samples and a redeploy.

A device triggers when its drift alert holds (the agent raises ``alert`` after
``consecutive_windows`` out-of-band windows) or when a window's measured agreement, judged on
at least MIN_SHADOWED inputs, falls below ``1 - budget - agreement_margin`` beyond its sampling
noise. A device triggers at most once per bundle it runs. Triggered devices of the same model
and group join one open re-analysis, which asks them for their disputed inputs (upload-samples
command) and

- ``approval`` mode: waits in ``pending_approval`` until POST /api/reanalyses/{id}/approve;
- ``auto`` mode (and after approval): waits until every trigger device uploaded samples, or
  ``samples_wait_s``, then queues an analysis of the same model whose pool = the model's pool
  + those field samples; once its bundle exists, deploys it to the group (staged as usual).

``why`` records the trigger in words, shown by the dashboard.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from sqlalchemy import select

from fleet_server.db import AnalysisRow, BundleRow, Database, DeviceRow, ReanalysisRow, SampleRow, new_id
from fleet_server.events import EventBus
from fleet_server.registry import ConflictError, add_analysis_row, fetch, log_event
from fleet_server.views import reanalysis_view
from toco_core.analysis.settings import AnalysisSettings
from toco_core.messages import DriftMessage, UploadSamplesCommand

log = logging.getLogger("toco.fleet.drift")
OPEN = ("pending_approval", "queued", "running")
MIN_SHADOWED = 20
MAX_FIELD_SAMPLES = 2000


def agreement_upper_bound(agreement: float, n: int, z: float = 2.0) -> float:
    """Wilson score upper bound of an agreement measured on n shadowed inputs (z = 2: ~98% one-sided).

    (p + z^2/2n + z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n).
    """
    n = max(n, 1)
    p = min(max(agreement, 0.0), 1.0)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (p + z * z / (2 * n) + spread) / (1 + z * z / n)


def trigger_reason(msg: DriftMessage, budget: float, margin: float) -> str | None:
    """Why this report triggers a re-analysis, or None: the alert, or agreement below 1 - budget - margin.

    The agreement must be below the floor beyond its sampling noise (agreement_upper_bound): two
    flips among 31 shadowed inputs (93.5%) are what a 99.4% model shows now and then, not drift.
    """
    if msg.alert:
        bad = ", ".join(msg.out_of_band) or "checks"
        return f"drift alert held for {msg.consecutive_out_of_band} windows ({bad} out of band)"
    floor = 1.0 - budget - margin
    a = msg.measured_agreement
    if a is not None and msg.n_shadowed >= MIN_SHADOWED and agreement_upper_bound(a, msg.n_shadowed) < floor:
        return (f"agreement {a:.1%} on {msg.n_shadowed} inputs, clearly below the fleet floor {floor:.1%} "
                f"(budget {budget:.1%})")
    return None


class DriftPolicy:
    """Turns drift triggers into re-analyses, and finished re-analyses into deployments."""

    def __init__(self, db: Database, events: EventBus, *, mode: str, budget: float, samples_wait_s: float,
                 send_command, deployments, jobs=None, canary_share: float = 0.1, failure_threshold: float = 0.2,
                 agreement_margin: float = 0.05) -> None:
        self.db, self.events = db, events
        self.mode, self.budget, self.samples_wait_s = mode, budget, samples_wait_s
        self.send_command, self.deployments, self.jobs = send_command, deployments, jobs
        self.canary_share, self.failure_threshold, self.agreement_margin = canary_share, failure_threshold, agreement_margin

    def on_drift(self, s, device: DeviceRow, msg: DriftMessage, after: list) -> None:
        """Ingest hook: open or join a re-analysis when this report triggers."""
        why = trigger_reason(msg, self.budget, self.agreement_margin)
        if why is None or not msg.bundle_id:
            return
        bundle = s.get(BundleRow, msg.bundle_id)
        if bundle is None:
            log.warning("drift on a bundle this server did not build", extra={"fields": {"device": device.id}})
            return
        for r in s.scalars(select(ReanalysisRow).where(ReanalysisRow.model_id == bundle.model_id)):
            if r.trigger_bundles.get(device.id) == msg.bundle_id:
                return  # this device already triggered on this bundle
        open_r = s.scalars(select(ReanalysisRow).where(ReanalysisRow.model_id == bundle.model_id,
                                                       ReanalysisRow.group == device.group,
                                                       ReanalysisRow.status.in_(("pending_approval", "queued")),
                                                       ReanalysisRow.analysis_id.is_(None))).first()
        line = f"{device.id}: {why} (window {msg.window_index})"
        if open_r is None:
            open_r = ReanalysisRow(id=new_id("r"), model_id=bundle.model_id, parent_analysis_id=bundle.analysis_id,
                                   group=device.group, trigger_devices=[], trigger_bundles={}, why="",
                                   status="pending_approval" if self.mode == "approval" else "queued",
                                   created_at=time.time())
            s.add(open_r)
        open_r.trigger_devices = [*open_r.trigger_devices, device.id]
        open_r.trigger_bundles = {**open_r.trigger_bundles, device.id: msg.bundle_id}
        open_r.why = (open_r.why + "; " if open_r.why else "") + line
        log_event(s, "reanalysis", {"reanalysis_id": open_r.id, "device_id": device.id, "why": why})
        refs = [d.ref for d in msg.disputed] or None
        cmd = UploadSamplesCommand(cmd_id=new_id("c"), window=msg.window_index, refs=refs)
        view = reanalysis_view(open_r)
        after.append(lambda: self.send_command(device.id, cmd))
        after.append(lambda: self.events.publish("reanalysis", view))

    def list(self) -> list[dict[str, Any]]:
        """Every re-analysis, newest first."""
        with self.db.session() as s:
            rows = s.scalars(select(ReanalysisRow).order_by(ReanalysisRow.created_at.desc())).all()
            return [reanalysis_view(r) for r in rows]

    def approve(self, *, reanalysis_id: str) -> dict[str, Any]:
        """Approve a pending re-analysis (it is queued at the next tick). Raises NotFoundError / ConflictError."""
        with self.db.session(write=True) as s:
            r = fetch(s, ReanalysisRow, reanalysis_id, "reanalysis")
            if r.status != "pending_approval":
                raise ConflictError(f"reanalysis {reanalysis_id!r} is {r.status}, not waiting for approval")
            r.status, r.approved_at = "queued", time.time()
            log_event(s, "reanalysis", {"reanalysis_id": r.id, "status": "queued", "approved": True})
            view = reanalysis_view(r)
        self.events.publish("reanalysis", view)
        return view

    def tick(self, now: float | None = None) -> None:
        """Queue the analyses of re-analyses whose samples are in (or waited long enough); follow running ones."""
        now = time.time() if now is None else now
        changed = []
        with self.db.session(write=True) as s:
            for r in s.scalars(select(ReanalysisRow).where(ReanalysisRow.status.in_(("queued", "running")))):
                if r.analysis_id is None:
                    if self._ready(s, r, now):
                        self._queue_analysis(s, r)
                        changed.append(reanalysis_view(r))
                elif r.status == "queued" and s.get(AnalysisRow, r.analysis_id).status == "running":
                    r.status = "running"
                    changed.append(reanalysis_view(r))
        for view in changed:
            self.events.publish("reanalysis", view)
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
        settings = AnalysisSettings.model_validate(parent.settings)
        row = add_analysis_row(s, model_id=r.model_id, settings=settings,
                               reason=f"drift: {', '.join(r.trigger_devices)}", field_sample_ids=ids)
        r.analysis_id = row.id
        r.why += f" -> re-analysis with {len(ids)} field samples"

    def on_analysis_done(self, analysis_id: str) -> None:
        """JobRunner hook: deploy a finished re-analysis to its group, or mark it failed."""
        with self.db.session() as s:
            r = s.scalars(select(ReanalysisRow).where(ReanalysisRow.analysis_id == analysis_id)).first()
            if r is None:
                return
            status, rid, group = s.get(AnalysisRow, analysis_id).status, r.id, r.group
        dep_id, new_status = None, "failed"
        if status == "done":
            try:
                dep = self.deployments.create(analysis_id=analysis_id, target={"group": group},
                                              canary_share=self.canary_share, failure_threshold=self.failure_threshold,
                                              reason=f"redeploy after drift re-analysis {rid}")
                dep_id, new_status = dep["deployment_id"], "deployed"
            except Exception as exc:
                log.warning("redeploy after re-analysis failed", extra={"fields": {"reanalysis": rid, "error": str(exc)}})
        with self.db.session(write=True) as s:
            r = s.get(ReanalysisRow, rid)
            r.status, r.deployment_id = new_status, dep_id
            log_event(s, "reanalysis", {"reanalysis_id": rid, "status": new_status, "deployment_id": dep_id})
            view = reanalysis_view(r)
        self.events.publish("reanalysis", view)
