"""The wave controller: sending a stage's commands, judging its outcomes, opening the next wave, the timeouts.

A deployment stops (``stopped``, remaining devices never get the command) as soon as failed / n passes
the failure threshold, or when a wave finishes with failed / sent above it. A device silent for
``timeout_s`` while in progress is failed (reason ``timeout``), so no deployment stays in progress
forever. Every function here runs inside a transaction that holds the deployment's row lock
(fleet_server.deployment_rules.lock_deployments).

A member is marked sent once its command is published. A command the MQTT client refuses
(PublishRefused: its packet ids are all taken, or the broker is gone) pauses the wave: that member and
the rest stay pending, and the next status message of the deployment or the leader's tick sends them
again. A wave's outcome is judged only once every member of it was sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, insert, or_, select, update

from fleet_server.db import Database, DeploymentDeviceRow, DeploymentRow, DeviceRow, TimelineRow
from fleet_server.deployment_queries import get_deployment
from fleet_server.deployment_rules import (
    OPEN_STAGES,
    analysis_budget,
    lock_deployments,
    stage_waves,
    wave_command,
)
from fleet_server.enrollment import ENROLLED
from fleet_server.events import EventBus
from fleet_server.mqtt_client import PublishRefused
from fleet_server.registry import log_event
from toco_core.messages import Message

log = logging.getLogger("toco.fleet.deployments")


@dataclass(frozen=True)
class WaveContext:
    """What moving a deployment on needs from its server: the database, the event bus, and
    ``send_command(device_id, command)``, which signs and publishes on the device's cmd topic."""

    db: Database
    events: EventBus
    send_command: Callable[[str, Message], None]


@dataclass(frozen=True)
class PublishView:
    """An ``after`` action: publish a deployment's view as committed (one per deployment and transaction)."""

    ctx: WaveContext
    deployment_id: str

    def __call__(self) -> None:
        self.ctx.events.publish("deployment", get_deployment(self.ctx.db, self.deployment_id))


def send_wave(ctx: WaveContext, s, dep: DeploymentRow, waves: tuple[str, ...], budget: float) -> bool:
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
            ctx.send_command(m.device_id, wave_command(dep, budget))
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


def advance(ctx: WaveContext, s, dep: DeploymentRow) -> bool:
    """Stop, send what was refused, open the next wave, or finish. Returns True when the stage changed."""
    if dep.stage not in OPEN_STAGES:
        return False
    # the members' outcomes counted by the database (it runs on every status message: loading a large
    # deployment's every member each time made its statuses quadratic, bench/deploy_create.py --statuses)
    counts = dict.fromkeys(("pending", "in_progress", "succeeded", "failed"), 0)
    unsent = 0  # pending members of the stage's own waves: their commands were refused (see send_wave)
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
        send_wave(ctx, s, dep, stage_waves(dep.stage), analysis_budget(s, dep))
        return False
    if not wave_done:
        return False
    if counts["pending"]:
        dep.stage = "rest"
        send_wave(ctx, s, dep, stage_waves(dep.stage), analysis_budget(s, dep))
        return True
    dep.stage, dep.finished_at = "done", time.time()
    log_event(s, "deployment", {"deployment_id": dep.id, "stage": "done", "failed": failed})
    return True


def after_change(ctx: WaveContext, s, deployment_id: str, after: list[Callable[[], None]]) -> None:
    """A member changed: move the deployment on, and publish its view once the transaction commits.

    Takes the context, the session (holding the deployment's lock) and the transaction's ``after`` list,
    to which a PublishView is added unless one for this deployment is there. Returns None.
    """
    advance(ctx, s, s.get(DeploymentRow, deployment_id))
    s.flush()
    publish_view_after(ctx, deployment_id, after)


def publish_view_after(ctx: WaveContext, deployment_id: str, after: list[Callable[[], None]]) -> None:
    """Add a PublishView of the deployment to the transaction's ``after`` list unless one is there. Returns None."""
    # one "deployment" event per deployment and transaction, its view read once committed: a view of
    # every member built for every status message made a large deployment's statuses quadratic
    if not any(isinstance(fn, PublishView) and fn.deployment_id == deployment_id for fn in after):
        after.append(PublishView(ctx, deployment_id))


def tick_deployments(ctx: WaveContext, *, now: float, timeout_s: float) -> int:
    """Fail members silent for longer than ``timeout_s``, send what a refused publish left unsent, and move
    the deployments on (the leader's duty). Returns how many members failed. Raises what the database raises.
    """
    after: list[Callable[[], None]] = []
    with ctx.db.session(write=True) as s:
        late_q = select(DeploymentDeviceRow).where(DeploymentDeviceRow.outcome == "in_progress",
                                                   DeploymentDeviceRow.updated_at < now - timeout_s)
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
            m.reason = f"timeout: no status for {timeout_s:.0f} s"
            s.add(TimelineRow(deployment_id=m.deployment_id, device_id=m.device_id, phase="failed", reason=m.reason,
                              t=now))
            dev = devices.get(m.device_id)
            if dev is not None:
                dev.deploy_state = "failed"
            touched.add(m.deployment_id)
        for dep_id in touched:
            after_change(ctx, s, dep_id, after)
    for fn in after:
        fn()
    return len(late)
