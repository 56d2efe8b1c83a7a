"""A deployment's vocabulary: its stages, waves and member outcomes, the command a wave sends, and the row lock.

Stages: ``canary`` (ceil(canary_share * n) devices, at least one) -> ``rest`` -> ``done``; ``stopped``
when failures pass the threshold, ``rolled_back`` on request. Members are ``pending`` until their
command is published, then ``in_progress`` until their status is final (``succeeded`` / ``failed``).

Replicas: status messages are ingested on any replica while the leader's tick fails silent devices,
so every path that changes a deployment's devices first locks the deployment's row
(``lock_deployments``: ``SELECT ... FOR UPDATE``, in id order). Two replicas never count one wave's
outcomes at the same time (which could send the next wave twice), and the fixed order cannot deadlock.
SQLite has no row locks; there the one serve process is the only writer.
"""

from __future__ import annotations

from sqlalchemy import select

from fleet_server.db import AnalysisRow, DeploymentRow, new_id
from toco_core.messages import FAILING_PHASES, DeployCommand, Phase, RollbackCommand

TERMINAL = ("succeeded", "failed")
OPEN_STAGES = ("canary", "rest")


def lock_deployments(s, deployment_ids) -> None:
    """Lock these deployments' rows until the session commits (PostgreSQL; a no-op on SQLite), in id order.

    Takes the session and the ids. Returns None. Raises what the database raises.
    """
    ids = sorted(set(deployment_ids))
    if ids:
        s.execute(select(DeploymentRow.id).where(DeploymentRow.id.in_(ids)).order_by(DeploymentRow.id)
                  .with_for_update())


def stage_waves(stage: str) -> tuple[str, ...]:
    """The waves whose members a stage sends: canary its own, rest both (a whole-group deployment is all canary)."""
    return ("canary",) if stage == "canary" else ("canary", "rest")


def outcome_of(phase: Phase) -> str:
    """active -> succeeded, failed/refused/rolled_back -> failed, anything else -> in_progress."""
    if phase is Phase.ACTIVE:
        return "succeeded"
    return "failed" if phase in FAILING_PHASES else "in_progress"


def wave_command(dep: DeploymentRow, budget: float) -> DeployCommand | RollbackCommand:
    """What a wave sends to one member: a deploy command, or for a rollback deployment a rollback command
    naming the bundle (the agent allows that older bundle, then deploys it under this deployment's id).

    Takes the deployment and its analysis' fidelity budget. Returns a new command (its own cmd_id).
    """
    if dep.command == "rollback":
        return RollbackCommand(cmd_id=new_id("c"), deployment_id=dep.id, bundle_id=dep.bundle_id,
                               reason=dep.reason or "rollback to an earlier version")
    return DeployCommand(cmd_id=new_id("c"), deployment_id=dep.id, bundle_id=dep.bundle_id, fidelity_budget=budget)


def analysis_budget(s, dep: DeploymentRow) -> float:
    """The fidelity budget of the deployment's analysis (what its deploy commands carry)."""
    return float(s.get(AnalysisRow, dep.analysis_id).settings.get("budget", 0.01))
