"""Deployments: a signed bundle to a device, a group or the whole fleet, in stages.

The server's one object for them (``Deployments``): creating one (targets chosen by
fleet_server.deployment_targets), reading them (fleet_server.deployment_queries), following status
messages (fleet_server.deployment_status) and the leader's tick (fleet_server.deployment_waves, which
sends the waves and moves the stages on; stages, outcomes and the row lock: fleet_server.deployment_rules),
and ``rollback``, which sends the rollback command to every device that got the bundle.
"""

from __future__ import annotations

import builtins
import math
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import insert, select

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
from fleet_server.deployment_queries import deployment_members, get_deployment, list_deployments
from fleet_server.deployment_rules import lock_deployments, stage_waves
from fleet_server.deployment_status import record_status
from fleet_server.deployment_targets import choose_targets, infeasible_warnings
from fleet_server.deployment_waves import WaveContext, send_wave, tick_deployments
from fleet_server.events import EventBus
from fleet_server.registry import ConflictError, fetch, log_event
from toco_core.bundle import BundleManifest
from toco_core.messages import RollbackCommand, StatusMessage


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

    @property
    def _ctx(self) -> WaveContext:
        # built on each use from the attributes, which a test or bench may swap (send_command)
        return WaveContext(self.db, self.events, self.send_command)

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
            devices = sorted(choose_targets(s, target, a.model_id))
            budget = float(a.settings.get("budget", 0.01))
            hardware: dict[str, dict[str, Any]] = dict(
                s.execute(select(DeviceRow.id, DeviceRow.hardware).where(DeviceRow.id.in_(devices))).all())
            paths = {"result_dir": a.result_dir, "model_path": fetch(s, ModelRow, a.model_id, "model").path}
        manifest = BundleManifest.model_validate(bundle.manifest)
        with open(bundle.path, "rb") as f:
            self.publisher.announce(manifest, f.read())
        warnings = infeasible_warnings(paths, hardware, budget)
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
            send_wave(self._ctx, s, dep, stage_waves(dep.stage), budget)
            log_event(s, "deployment", {"deployment_id": dep.id, "target": target, "devices": len(devices),
                                        "expected_infeasible": warnings})
        view = self.get(deployment_id=dep.id)
        self.events.publish("deployment", view)
        return view

    def get(self, *, deployment_id: str) -> dict[str, Any]:
        """One Deployment with its devices. Raises NotFoundError."""
        return get_deployment(self.db, deployment_id)

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every deployment, newest first."""
        return list_deployments(self.db)

    def on_status(self, s, device: DeviceRow, msg: StatusMessage, after: builtins.list[Callable[[], None]]) -> None:
        """Ingest hook: record a device's status in its deployment and move the deployment on
        (fleet_server.deployment_status.record_status)."""
        record_status(self._ctx, s, device, msg, after)

    def tick(self, now: float | None = None) -> int:
        """Fail devices silent for longer than the timeout, send what a refused publish left unsent, and move
        the deployments on. Returns how many devices failed."""
        return tick_deployments(self._ctx, now=time.time() if now is None else now, timeout_s=self.timeout_s)

    def rollback(self, *, deployment_id: str) -> dict[str, Any]:
        """Send the rollback command to every device that got the bundle; the stage becomes rolled_back."""
        with self.db.session(write=True) as s:
            lock_deployments(s, [deployment_id])
            dep = fetch(s, DeploymentRow, deployment_id, "deployment")
            if dep.stage == "rolled_back":
                raise ConflictError(f"deployment {deployment_id!r} is already rolled back")
            now = time.time()
            for m in deployment_members(s, deployment_id):
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
