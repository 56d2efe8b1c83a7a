"""A device's status message recorded in its deployment: the member's phase and outcome, the device's state.

Per-device phases come from the agents' status messages, idempotent by deployment and phase: nothing
moves a member out of a terminal outcome (a late or repeated message only adds a timeline line).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from fleet_server.db import DeploymentDeviceRow, DeploymentRow, DeviceRow, TimelineRow
from fleet_server.deployment_rules import TERMINAL, lock_deployments, outcome_of
from fleet_server.deployment_waves import WaveContext, after_change, publish_view_after
from toco_core.messages import Phase, StatusMessage

log = logging.getLogger("toco.fleet.deployments")


def active_after(before: dict | None, msg: StatusMessage, bundle_id: str) -> dict[str, Any]:
    """The device's stored ``active`` after a successful final status: its bundle and plan (as JSON),
    the agreements the status reports, the model name from the plan (else the one known before), and
    the box's storage as it reported it on activation (bytes received, state dir, drift shadow)."""
    plan = msg.plan
    return {"bundle_id": msg.bundle_id or bundle_id,
            "model_name": (plan.model_name if plan else None) or (before or {}).get("model_name"),
            "plan": plan.model_dump(mode="json") if plan else None,
            "predicted_agreement": msg.predicted_agreement, "measured_agreement": msg.measured_agreement,
            "download_bytes": msg.download_bytes, "state_dir_bytes": msg.state_dir_bytes, "shadow": msg.shadow}


def record_status(ctx: WaveContext, s, device: DeviceRow, msg: StatusMessage,
                  after: list[Callable[[], None]]) -> None:
    """Ingest hook: record a device's status in its deployment and move the deployment on.

    Takes the wave context, the ingest's session, the device's row, the message and the transaction's
    ``after`` list (events published once committed). Returns None. Raises what the database raises.
    """
    if not msg.deployment_id:
        return
    lock_deployments(s, [msg.deployment_id])  # before its members are read (fleet_server.deployment_rules)
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
    after.append(lambda: ctx.events.publish("status", status))
    new_outcome = outcome_of(msg.phase)
    if m.outcome in TERMINAL:
        # a late or repeated message never reopens a finished device; a rollback is only noted
        if msg.phase is Phase.ROLLED_BACK:
            m.phase, m.reason, m.updated_at = msg.phase.value, reason, now
            device.deploy_state = None
        return
    unchanged = m.outcome == new_outcome
    m.phase, m.outcome, m.reason, m.updated_at = msg.phase.value, new_outcome, reason, now
    if unchanged:
        # a progress report (downloading, verified, self_test: an agent sends about a dozen per deployment)
        # changes no wave count, so the deployment is not advanced: its count of every member ran per status
        # and held one replica to ~136 statuses/s (docs/topology.md); the view is still published
        publish_view_after(ctx, m.deployment_id, after)
        return
    if new_outcome == "succeeded":
        device.deploy_state = None
        device.alert = False
        device.active = active_after(device.active, msg, s.get(DeploymentRow, m.deployment_id).bundle_id)
    elif new_outcome == "failed":
        device.deploy_state = "failed" if msg.phase is not Phase.ROLLED_BACK else None
    after_change(ctx, s, m.deployment_id, after)
