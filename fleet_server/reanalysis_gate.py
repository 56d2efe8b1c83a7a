"""When a fidelity trigger may start a re-analysis, and when a group may get its bundle.

- at most one open re-analysis per (model, group): a later trigger joins it (and counts as a vote);
- a minimum interval between two re-analyses of one (model, group) (cooldown), and a cap on the
  re-analyses of one model in any 24 hours;
- a group redeploy needs a quorum of the group's online devices: ``quorum_count``, else
  ``ceil(quorum_share * online)``, and at least ``quorum_min``; or an operator's approval.

Groups are the server's enrollment records (DeviceRow.group), never what a device claims.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from sqlalchemy import func, select

from fleet_server.db import DeviceRow, ReanalysisRow
from fleet_server.enrollment import ENROLLED

OPEN = ("pending_approval", "queued", "running", "canary")
DAY_S = 86400.0


@dataclass(frozen=True)
class GateSettings:
    """The gate's numbers (fleet_server.config.FleetSettings has them with their bounds)."""

    min_interval_s: float = 600.0
    daily_cap: int = 6
    quorum_share: float = 0.5
    quorum_min: int = 2
    quorum_count: int | None = None


def gate_settings(settings) -> GateSettings:
    """The gate's numbers from the server's FleetSettings."""
    return GateSettings(min_interval_s=settings.reanalysis_min_interval_s, daily_cap=settings.reanalysis_daily_cap,
                        quorum_share=settings.quorum_share, quorum_min=settings.quorum_min,
                        quorum_count=settings.quorum_count)


def open_reanalysis(s, model_id: str, group: str) -> ReanalysisRow | None:
    """The open re-analysis of (model, group), if any (analysing, waiting, or canary deployed)."""
    return s.scalars(select(ReanalysisRow).where(ReanalysisRow.model_id == model_id, ReanalysisRow.group == group,
                                                 ReanalysisRow.status.in_(OPEN))
                     .order_by(ReanalysisRow.created_at.desc())).first()


def held_by(s, model_id: str, group: str, gate: GateSettings, now: float | None = None) -> str | None:
    """Why a new re-analysis of (model, group) may not start now (cooldown, daily cap), or None."""
    now = time.time() if now is None else now
    last = s.scalar(select(func.max(ReanalysisRow.created_at)).where(ReanalysisRow.model_id == model_id,
                                                                     ReanalysisRow.group == group))
    if last is not None and now - last < gate.min_interval_s:
        return (f"cooldown: the last re-analysis of this model for group {group!r} started {now - last:.0f} s ago "
                f"(minimum {gate.min_interval_s:.0f} s)")
    today = s.scalar(select(func.count()).select_from(ReanalysisRow).where(ReanalysisRow.model_id == model_id,
                                                                          ReanalysisRow.created_at > now - DAY_S))
    if today >= gate.daily_cap:
        return f"daily cap: {today} re-analyses of this model in the last 24 h (cap {gate.daily_cap})"
    return None


def group_online(s, group: str) -> list[str]:
    """The enrolled devices of ``group`` online now."""
    return list(s.scalars(select(DeviceRow.id).where(DeviceRow.group == group, DeviceRow.online.is_(True),
                                                     DeviceRow.enrollment == ENROLLED)))


def quorum_needed(online: int, gate: GateSettings) -> int:
    """Devices whose fidelity alerts a group redeploy needs, of ``online`` devices in the group."""
    if gate.quorum_count is not None:
        return gate.quorum_count
    return max(gate.quorum_min, math.ceil(gate.quorum_share * online - 1e-9))
