"""Deployments: a signed bundle to a device, a group or the whole fleet, in stages.

Stages: ``canary`` (ceil(canary_share * n) devices, at least one) -> ``rest`` -> ``done``.
A deployment stops (``stopped``, remaining devices never get the command) as soon as
failed / n passes the failure threshold, or when a wave finishes with failed / sent above
it. A device silent for ``timeout_s`` while in progress is failed (reason ``timeout``), so no
deployment stays in progress forever. ``rollback`` sends the rollback command to every device
that got the bundle. Per-device phases come from the agents' status messages (idempotent by
deployment and phase: nothing moves a device out of a terminal outcome).

Replicas: status messages are ingested on any replica while the leader's tick fails silent devices,
so every path that changes a deployment's devices first locks the deployment's row
(``lock_deployments``: ``SELECT ... FOR UPDATE``, in id order). Two replicas never count one wave's
outcomes at the same time (which could send the next wave twice), and the fixed order cannot deadlock.
SQLite has no row locks; there the one serve process is the only writer.

A member is marked sent once its command is published. A command the MQTT client refuses
(PublishRefused: its packet ids are all taken) pauses the wave: that member and the rest stay
pending, and the next status message of the deployment or the leader's tick sends them again. A
wave's outcome is judged only once every member of it was sent.
"""

from __future__ import annotations

import builtins
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, or_, select, update

from fleet_server.db import (
    AnalysisRow,
    BundleRow,
    Database,
    DeploymentDeviceRow,
    DeploymentRow,
    DeviceRow,
    ModelRow,
    TimelineRow,
    new_id,
)
from fleet_server.enrollment import ENROLLED
from fleet_server.enrollment import may_run as may_run_model
from fleet_server.events import EventBus
from fleet_server.model_versions import lineage_of
from fleet_server.mqtt_client import PublishRefused
from fleet_server.registry import ConflictError, NotFoundError, fetch, log_event
from fleet_server.views import deployment_view
from fleet_server.whatif import expected_infeasible
from toco_core.bundle import BundleManifest
from toco_core.errors import TocoError
from toco_core.messages import FAILING_PHASES, DeployCommand, Phase, RollbackCommand, StatusMessage

log = logging.getLogger("toco.fleet.deployments")


def lock_deployments(s, deployment_ids) -> None:
    """Lock these deployments' rows until the session commits (PostgreSQL; a no-op on SQLite), in id order.

    Takes the session and the ids. Returns None. Raises what the database raises.
    """
    ids = sorted(set(deployment_ids))
    if ids:
        s.execute(select(DeploymentRow.id).where(DeploymentRow.id.in_(ids)).order_by(DeploymentRow.id)
                  .with_for_update())
TERMINAL = ("succeeded", "failed")
OPEN_STAGES = ("canary", "rest")


def stage_waves(stage: str) -> tuple[str, ...]:
    """The waves whose members a stage sends: canary its own, rest both (a whole-group deployment is all canary)."""
    return ("canary",) if stage == "canary" else ("canary", "rest")


def outcome_of(phase: Phase) -> str:
    """active -> succeeded, failed/refused/rolled_back -> failed, anything else -> in_progress."""
    if phase is Phase.ACTIVE:
        return "succeeded"
    return "failed" if phase in FAILING_PHASES else "in_progress"


def device_history(db: Database, *, device_id: str, limit: int = 200) -> list[dict[str, Any]]:
    """A device's deployment timeline, newest first: deployment_id, bundle_id, phase, reason, t."""
    with db.session() as s:
        rows = s.execute(select(TimelineRow, DeploymentRow.bundle_id)
                         .join(DeploymentRow, DeploymentRow.id == TimelineRow.deployment_id)
                         .where(TimelineRow.device_id == device_id).order_by(TimelineRow.id.desc()).limit(limit)).all()
        return [{"deployment_id": t.deployment_id, "bundle_id": b, "phase": t.phase, "reason": t.reason, "t": t.t}
                for t, b in rows]


def _active_after(before: dict | None, msg: StatusMessage, bundle_id: str) -> dict[str, Any]:
    """The device's stored ``active`` after a successful final status: its bundle and plan (as JSON),
    the agreements the status reports, the model name from the plan (else the one known before), and
    the box's storage as it reported it on activation (bytes received, state dir, drift shadow)."""
    plan = msg.plan
    return {"bundle_id": msg.bundle_id or bundle_id,
            "model_name": (plan.model_name if plan else None) or (before or {}).get("model_name"),
            "plan": plan.model_dump(mode="json") if plan else None,
            "predicted_agreement": msg.predicted_agreement, "measured_agreement": msg.measured_agreement,
            "download_bytes": msg.download_bytes, "state_dir_bytes": msg.state_dir_bytes, "shadow": msg.shadow}


def _expected_infeasible(paths: dict[str, str | None], hardware: dict[str, dict], budget: float) -> list[dict]:
    """The advisory per-device check (fleet_server.whatif.expected_infeasible), never a refusal: the
    box decides with its own numbers, but whoever deploys hears it first. A check that cannot run
    (analysis files gone) is logged and the deployment goes ahead."""
    if not paths["result_dir"]:
        return []
    try:
        return expected_infeasible(result_dir=paths["result_dir"], model_path=paths["model_path"] or "",
                                   hardware=hardware,
                                   budget=budget)
    except (TocoError, OSError) as exc:
        log.warning("no feasibility check for this deployment", extra={"fields": {"error": str(exc)}})
        return []


@dataclass(frozen=True)
class _PublishView:
    """An ``after`` action: publish a deployment's view as committed (one per deployment and transaction)."""

    deployments: Deployments
    deployment_id: str

    def __call__(self) -> None:
        self.deployments.events.publish("deployment", self.deployments.get(deployment_id=self.deployment_id))


class Deployments:
    """Creates deployments, follows status messages and timeouts, and moves the stages on."""

    def __init__(self, db: Database, events: EventBus, *, publisher, send_command, timeout_s: float) -> None:
        """``publisher`` is a BundlePublisher; ``send_command(device_id, command)`` publishes on the
        device's cmd topic."""
        self.db, self.events = db, events
        self.publisher, self.send_command = publisher, send_command
        self.timeout_s = timeout_s
        # packs an analysis' bundle again when retention deleted it (fleet_server.bundle_retention);
        # the server sets it once its job runner exists
        self.repack: Callable[[str], str] | None = None

    # --- create / read ----------------------------------------------------------------------

    def _targets(self, s, target: dict, model_id: str) -> list[str]:
        # only enrolled devices allowed this model: a quarantined or revoked one is never sent a command.
        # Allowing a model's v1 id (its lineage id) allows every version of it; a later version's id, that one only
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

    def create(self, *, analysis_id: str, target: dict, canary_share: float, failure_threshold: float,
               reason: str | None = None, command: str = "deploy") -> dict[str, Any]:
        """Start a deployment of the analysis's bundle. Returns the Deployment, plus
        ``expected_infeasible``: the targeted devices whose own profile and caps leave the solver
        no plan within the budget (fleet_server.whatif.expected_infeasible); they still get the
        bundle and report their own verdict.

        ``command``: ``deploy``, or ``rollback`` to send each device a signed rollback command naming
        the bundle instead (an older version's bundle, which devices refuse through a deploy command;
        fleet_server.version_rollback). Staging, timeouts and the failure threshold are the same.

        A finished analysis whose bundle retention deleted is packed again first.
        Raises NotFoundError for an unknown analysis/device/group, ConflictError when the analysis
        has no bundle yet or no device is online.
        """
        with self.db.session() as s:
            a = fetch(s, AnalysisRow, analysis_id, "analysis")
            status, bundle_id = a.status, a.bundle_id
        if status != "done":
            raise ConflictError(f"analysis {analysis_id!r} is {status}; only a finished analysis has a bundle",
                                "wait until it is done")
        if not bundle_id:
            if self.repack is None:
                raise ConflictError(f"the bundle of analysis {analysis_id!r} was deleted as superseded",
                                    "deploy it from a running fleet server, which packs it again")
            bundle_id = self.repack(analysis_id)
        with self.db.session() as s:
            a = fetch(s, AnalysisRow, analysis_id, "analysis")
            bundle = fetch(s, BundleRow, bundle_id or "", "bundle")
            devices = sorted(self._targets(s, target, a.model_id))
            budget = float(a.settings.get("budget", 0.01))
            hardware: dict[str, dict[str, Any]] = dict(
                s.execute(select(DeviceRow.id, DeviceRow.hardware).where(DeviceRow.id.in_(devices))).all())
            paths = {"result_dir": a.result_dir, "model_path": fetch(s, ModelRow, a.model_id, "model").path}
        manifest = BundleManifest.model_validate(bundle.manifest)
        with open(bundle.path, "rb") as f:
            self.publisher.announce(manifest, f.read())
        warnings = _expected_infeasible(paths, hardware, budget)
        expected = {w["device_id"]: w["reason"] for w in warnings}
        n_canary = min(len(devices), max(1, math.ceil(canary_share * len(devices) - 1e-9)))
        dep = DeploymentRow(id=new_id("d"), analysis_id=analysis_id, bundle_id=bundle.id, target=target,
                            stage="canary" if n_canary < len(devices) else "rest", canary_share=canary_share,
                            failure_threshold=failure_threshold, reason=reason, created_at=time.time(), command=command)
        with self.db.session(write=True) as s:
            s.add(dep)
            s.flush()
            now = time.time()
            # one executemany, not an ORM object per device: 2,000 members took seconds (bench/deploy_create.py)
            s.execute(insert(DeploymentDeviceRow), [
                {"deployment_id": dep.id, "device_id": dev, "wave": "canary" if i < n_canary else "rest",
                 "phase": "pending", "outcome": "pending", "expected_infeasible": expected.get(dev), "updated_at": now}
                for i, dev in enumerate(devices)])
            self._send_wave(s, dep, stage_waves(dep.stage), budget)
            log_event(s, "deployment", {"deployment_id": dep.id, "target": target, "devices": len(devices),
                                        "expected_infeasible": warnings})
        view = self.get(deployment_id=dep.id)
        self.events.publish("deployment", view)
        return view

    def get(self, *, deployment_id: str) -> dict[str, Any]:
        """One Deployment with its devices. Raises NotFoundError."""
        with self.db.session() as s:
            dep = fetch(s, DeploymentRow, deployment_id, "deployment")
            return deployment_view(dep, self._members(s, deployment_id))

    def list(self) -> list[dict[str, Any]]:
        """Every deployment, newest first."""
        with self.db.session() as s:
            deps = s.scalars(select(DeploymentRow).order_by(DeploymentRow.created_at.desc())).all()
            return [deployment_view(d, self._members(s, d.id)) for d in deps]

    @staticmethod
    def _members(s, deployment_id: str) -> builtins.list[DeploymentDeviceRow]:
        return list(s.scalars(select(DeploymentDeviceRow).where(DeploymentDeviceRow.deployment_id == deployment_id)
                              .order_by(DeploymentDeviceRow.device_id)))

    # --- moving on ----------------------------------------------------------------------------

    def _send_wave(self, s, dep: DeploymentRow, waves: tuple[str, ...], budget: float) -> bool:
        """Publish the commands of the pending members of ``waves`` and mark each one sent once published
        (or failed when revoked meanwhile: nothing is sent).

        The rows are read in one query and written in bulk, inside the caller's transaction. A command the
        MQTT client refuses (PublishRefused) stops the wave there: that member and the ones after it stay
        pending, to be sent again later (module docstring). Returns True when no member is left unsent.
        Raises what the database raises, and what ``send_command`` raises but PublishRefused (which rolls
        the caller's transaction back, marks included).
        """
        now = time.time()
        # the wave's members with their devices in one query (None: the device row is gone); the ORM
        # flushes the changed rows below as executemany batches instead of a round trip per device
        wave_rows = s.execute(select(DeploymentDeviceRow, DeviceRow)
                              .outerjoin(DeviceRow, DeviceRow.id == DeploymentDeviceRow.device_id)
                              .where(DeploymentDeviceRow.deployment_id == dep.id,
                                     DeploymentDeviceRow.wave.in_(waves), DeploymentDeviceRow.outcome == "pending")
                              .order_by(DeploymentDeviceRow.device_id)).all()
        timeline = []
        complete = True
        for k, (m, dev) in enumerate(wave_rows):
            if dev is None or dev.enrollment != ENROLLED:  # revoked since the deployment began: nothing is sent
                m.phase, m.outcome, m.reason, m.updated_at = "failed", "failed", "revoked: not sent", now
                timeline.append({"deployment_id": dep.id, "device_id": m.device_id, "phase": "failed",
                                 "reason": m.reason, "t": now})
                continue
            try:
                self.send_command(m.device_id, self._command(dep, budget))
            except PublishRefused as exc:
                complete = False
                log.warning("deploy wave paused: a command was refused; the rest is sent later",
                            extra={"fields": {"deployment": dep.id, "unsent": len(wave_rows) - k, "error": str(exc)}})
                break
            m.phase, m.outcome, m.sent_at, m.updated_at = "sent", "in_progress", now, now
            timeline.append({"deployment_id": dep.id, "device_id": m.device_id, "phase": "sent", "reason": None,
                             "t": now})
            dev.deploy_state = "deploying"
        if timeline:
            s.execute(insert(TimelineRow), timeline)
        s.flush()
        return complete

    @staticmethod
    def _command(dep: DeploymentRow, budget: float) -> DeployCommand | RollbackCommand:
        """What a wave sends: a deploy command, or for a rollback deployment a rollback command naming the
        bundle (the agent allows that older bundle, then deploys it under this deployment's id)."""
        if dep.command == "rollback":
            return RollbackCommand(cmd_id=new_id("c"), deployment_id=dep.id, bundle_id=dep.bundle_id,
                                   reason=dep.reason or "rollback to an earlier version")
        return DeployCommand(cmd_id=new_id("c"), deployment_id=dep.id, bundle_id=dep.bundle_id, fidelity_budget=budget)

    @staticmethod
    def _budget(s, dep: DeploymentRow) -> float:
        """The fidelity budget of the deployment's analysis (what its deploy commands carry)."""
        return float(s.get(AnalysisRow, dep.analysis_id).settings.get("budget", 0.01))

    def _advance(self, s, dep: DeploymentRow) -> bool:
        """Stop, open the next wave, or finish. Returns True when the stage changed."""
        if dep.stage not in OPEN_STAGES:
            return False
        # the members' outcomes counted by the database (it runs on every status message: loading a large
        # deployment's every member each time made its statuses quadratic, bench/deploy_create.py --statuses)
        counts = dict.fromkeys(("pending", "in_progress", "succeeded", "failed"), 0)
        unsent = 0  # pending members of the stage's own waves: their commands were refused (see _send_wave)
        for wave, outcome, k in s.execute(select(DeploymentDeviceRow.wave, DeploymentDeviceRow.outcome, func.count())
                                          .where(DeploymentDeviceRow.deployment_id == dep.id)
                                          .group_by(DeploymentDeviceRow.wave, DeploymentDeviceRow.outcome)):
            counts[outcome] += k
            if outcome == "pending" and wave in stage_waves(dep.stage):
                unsent += k
        n = sum(counts.values())
        sent, failed = n - counts["pending"], counts["failed"]
        # every member of the stage's waves sent, and each one succeeded or failed
        wave_done = counts["in_progress"] == 0 and unsent == 0
        if failed / n > dep.failure_threshold or (wave_done and sent and failed / sent > dep.failure_threshold):
            dep.stage, dep.finished_at = "stopped", time.time()
            dep.reason = (f"stopped: {failed} of {sent} devices failed, share {failed / sent:.0%} "
                          f"passes the threshold {dep.failure_threshold:.0%}")
            s.execute(update(DeploymentDeviceRow).where(DeploymentDeviceRow.deployment_id == dep.id,
                                                        DeploymentDeviceRow.outcome == "pending")
                      .values(phase="not_sent"))
            log_event(s, "deployment", {"deployment_id": dep.id, "stage": dep.stage, "reason": dep.reason})
            return True
        if unsent:  # the stage's refused commands, sent again; the stage moves on once they are all out
            self._send_wave(s, dep, stage_waves(dep.stage), self._budget(s, dep))
            return False
        if not wave_done:
            return False
        if counts["pending"]:
            dep.stage = "rest"
            self._send_wave(s, dep, stage_waves(dep.stage), self._budget(s, dep))
            return True
        dep.stage, dep.finished_at = "done", time.time()
        log_event(s, "deployment", {"deployment_id": dep.id, "stage": "done", "failed": failed})
        return True

    def on_status(self, s, device: DeviceRow, msg: StatusMessage, after: builtins.list[Callable[[], None]]) -> None:
        """Ingest hook: record a device's status in its deployment and move the deployment on."""
        if not msg.deployment_id:
            return
        lock_deployments(s, [msg.deployment_id])  # before its members are read (see the module's docstring)
        m = s.get(DeploymentDeviceRow, (msg.deployment_id, device.id), populate_existing=True)
        if m is None:
            log.info("status for a deployment this device is not part of",
                     extra={"fields": {"device": device.id, "deployment": msg.deployment_id}})
            return
        reason = None if msg.reason is None else (
            f"{msg.reason.value}: {msg.detail}" if msg.detail else msg.reason.value)
        now = time.time()
        s.add(TimelineRow(deployment_id=m.deployment_id, device_id=device.id, phase=msg.phase.value, reason=reason,
                          t=now))
        status = {"device_id": device.id, "deployment_id": m.deployment_id, "phase": msg.phase.value, "reason": reason,
                  "t": now, "progress": msg.progress}
        after.append(lambda: self.events.publish("status", status))
        new_outcome = outcome_of(msg.phase)
        if m.outcome in TERMINAL:
            # a late or repeated message never reopens a finished device; a rollback is only noted
            if msg.phase is Phase.ROLLED_BACK:
                m.phase, m.reason, m.updated_at = msg.phase.value, reason, now
                device.deploy_state = None
            return
        m.phase, m.outcome, m.reason, m.updated_at = msg.phase.value, new_outcome, reason, now
        if new_outcome == "succeeded":
            device.deploy_state = None
            device.alert = False
            device.active = _active_after(device.active, msg, s.get(DeploymentRow, m.deployment_id).bundle_id)
        elif new_outcome == "failed":
            device.deploy_state = "failed" if msg.phase is not Phase.ROLLED_BACK else None
        self._after_change(s, m.deployment_id, after)

    def _after_change(self, s, deployment_id: str, after: builtins.list[Callable[[], None]]) -> None:
        dep = s.get(DeploymentRow, deployment_id)
        self._advance(s, dep)
        s.flush()
        # one "deployment" event per deployment and transaction, its view read once committed: a view of
        # every member built for every status message made a large deployment's statuses quadratic
        if not any(isinstance(fn, _PublishView) and fn.deployment_id == deployment_id for fn in after):
            after.append(_PublishView(self, deployment_id))

    def tick(self, now: float | None = None) -> int:
        """Fail devices silent for longer than the timeout, send what a refused publish left unsent, and move
        the deployments on. Returns how many devices failed."""
        now = time.time() if now is None else now
        after: list = []
        with self.db.session(write=True) as s:
            late_q = select(DeploymentDeviceRow).where(DeploymentDeviceRow.outcome == "in_progress",
                                                       DeploymentDeviceRow.updated_at < now - self.timeout_s)
            late = s.scalars(late_q).all()
            # open deployments with members of their stage's waves still pending: their commands were refused
            unsent = set(s.scalars(select(DeploymentDeviceRow.deployment_id).distinct()
                                   .join(DeploymentRow, DeploymentRow.id == DeploymentDeviceRow.deployment_id)
                                   .where(DeploymentDeviceRow.outcome == "pending",
                                          DeploymentRow.stage.in_(OPEN_STAGES),
                                          or_(DeploymentRow.stage == "rest", DeploymentDeviceRow.wave == "canary"))))
            if late or unsent:  # lock their deployments, then read again: a replica's ingest may just have moved them
                lock_deployments(s, [*unsent, *(m.deployment_id for m in late)])
                late = s.scalars(late_q.execution_options(populate_existing=True)).all()
            touched = set(unsent)
            # their devices in one query, not one per late member (a whole silent wave can time out at once)
            devices = {d.id: d for d in s.scalars(select(DeviceRow).where(
                DeviceRow.id.in_(sorted({m.device_id for m in late}))))} if late else {}
            for m in late:
                m.phase, m.outcome, m.updated_at = "failed", "failed", now
                m.reason = f"timeout: no status for {self.timeout_s:.0f} s"
                s.add(TimelineRow(deployment_id=m.deployment_id, device_id=m.device_id, phase="failed", reason=m.reason,
                                  t=now))
                dev = devices.get(m.device_id)
                if dev is not None:
                    dev.deploy_state = "failed"
                touched.add(m.deployment_id)
            for dep_id in touched:
                self._after_change(s, dep_id, after)
        for fn in after:
            fn()
        return len(late)

    def rollback(self, *, deployment_id: str) -> dict[str, Any]:
        """Send the rollback command to every device that got the bundle; the stage becomes rolled_back."""
        with self.db.session(write=True) as s:
            lock_deployments(s, [deployment_id])
            dep = fetch(s, DeploymentRow, deployment_id, "deployment")
            if dep.stage == "rolled_back":
                raise ConflictError(f"deployment {deployment_id!r} is already rolled back")
            now = time.time()
            for m in self._members(s, deployment_id):
                if m.outcome == "pending":
                    m.phase = "not_sent"
                    continue
                self.send_command(m.device_id, RollbackCommand(cmd_id=new_id("c"), deployment_id=deployment_id,
                                                               reason="rollback requested"))
                s.add(TimelineRow(deployment_id=deployment_id, device_id=m.device_id, phase="rollback_sent", t=now))
                m.phase, m.updated_at = "rollback_sent", now
            dep.stage, dep.finished_at = "rolled_back", now
            dep.reason = "rolled back on request"
            log_event(s, "deployment", {"deployment_id": deployment_id, "stage": "rolled_back"})
        view = self.get(deployment_id=deployment_id)
        self.events.publish("deployment", view)
        return view
