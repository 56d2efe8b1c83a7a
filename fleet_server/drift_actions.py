"""What an operator does with a drift alert: accept the new data as normal, acknowledge it, or
re-analyse anyway. (Registering a retrained model version is ``toco-fleet models add`` with the
model's name: the alert views carry that hint; versions are fleet_server's model registry's job.)

Accepting sends each device a signed rebase-drift command (toco_core.messages.RebaseDriftCommand):
the box moves its drift reference onto its last field windows, so the same inputs are in band from
then on and later windows are judged against them. ``scope="group"`` does this for every online
device of the alert's group (its enrolled group) and closes their active alerts of that model.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import select

from fleet_server.db import Database, DeviceRow, DriftAlertRow, new_id
from fleet_server.drift_alerts import ACTIVE, alert_view, decide
from fleet_server.events import EventBus
from fleet_server.reanalysis_gate import group_online
from fleet_server.registry import ConflictError, fetch, log_event
from toco_core.messages import RebaseDriftCommand


def field_windows(alert: DriftAlertRow) -> int:
    """How many of the box's last windows show the new data: the out-of-band streak of the alert's latest
    window (1-4). Pooling an older, in-band window into the new reference would leave the new data
    half outside it, and the box would alert again on what the operator just accepted."""
    last = ((alert.evidence or {}).get("windows") or [{}])[-1]
    return min(4, max(1, int(last.get("consecutive_out_of_band") or 1)))


class DriftActions:
    """The operator's actions on drift alerts (the API and ``toco-fleet alerts`` call these)."""

    def __init__(self, db: Database, events: EventBus, send_command, policy) -> None:
        self.db, self.events, self.send_command, self.policy = db, events, send_command, policy

    def list(self, *, device_id: str | None = None, active: bool = False) -> list[dict[str, Any]]:
        """Alerts, newest first; of one device, and only the active ones, when asked."""
        with self.db.session() as s:
            q = select(DriftAlertRow).order_by(DriftAlertRow.created_at.desc())
            if device_id is not None:
                q = q.where(DriftAlertRow.device_id == device_id)
            if active:
                q = q.where(DriftAlertRow.status.in_(ACTIVE))
            return [alert_view(a) for a in s.scalars(q.limit(1000))]

    def _active(self, s, alert_id: str) -> DriftAlertRow:
        a = fetch(s, DriftAlertRow, alert_id, "drift alert")
        if a.status not in ACTIVE:
            raise ConflictError(f"drift alert {alert_id!r} is {a.status} already", "see GET /api/drift-alerts")
        return a

    def accept(self, *, alert_id: str, scope: Literal["device", "group"] = "device") -> dict[str, Any]:
        """Accept the alert's new data as normal: rebase the device's (or its group's) drift reference.

        Returns the alert. Raises NotFoundError for an unknown alert, ConflictError for a closed one.
        """
        sends, views = [], []
        with self.db.session(write=True) as s:
            a = self._active(s, alert_id)
            devices = [a.device_id] if scope == "device" else sorted({a.device_id, *group_online(s, a.group)})
            closing = [a]
            if scope == "group":
                closing += [o for o in s.scalars(select(DriftAlertRow).where(
                    DriftAlertRow.group == a.group, DriftAlertRow.model_id == a.model_id,
                    DriftAlertRow.status.in_(ACTIVE), DriftAlertRow.id != a.id))]
            for o in closing:
                decide(o, "accepted", f"{o.decision}; operator accepted the new data as normal: the drift "
                                      f"reference of {'the group' if scope == 'group' else 'the device'} is rebased "
                                      "on its field windows".lstrip("; "))
                views.append(alert_view(o))
            windows = field_windows(a)
            for device_id in devices:
                d = s.get(DeviceRow, device_id)
                if d is not None:
                    d.alert, d.drift_kind = False, None
                sends.append((device_id, RebaseDriftCommand(cmd_id=new_id("c"), reason="accepted", alert_id=a.id,
                                                            windows=windows)))
            log_event(s, "drift_alert", {"alert_id": a.id, "status": "accepted", "scope": scope, "devices": devices})
        for device_id, cmd in sends:
            self.send_command(device_id, cmd)
        for view in views:
            self.events.publish("drift_alert", view)
        return views[0]

    def acknowledge(self, *, alert_id: str) -> dict[str, Any]:
        """Acknowledge an alert: seen, nothing changes on the device. Raises NotFoundError / ConflictError."""
        with self.db.session(write=True) as s:
            a = self._active(s, alert_id)
            decide(a, "acknowledged", f"{a.decision}; acknowledged by the operator".lstrip("; "))
            d = s.get(DeviceRow, a.device_id)
            if d is not None:
                d.drift_kind = None
            log_event(s, "drift_alert", {"alert_id": a.id, "status": "acknowledged"})
            view = alert_view(a)
        self.events.publish("drift_alert", view)
        return view

    def reanalyse(self, *, alert_id: str) -> dict[str, Any]:
        """Re-analyse anyway (whatever the kind, cooldown or daily cap; an open re-analysis of the group
        is joined). Returns the alert. Raises NotFoundError / ConflictError."""
        after: list = []
        with self.db.session(write=True) as s:
            a = self._active(s, alert_id)
            if a.status == "reanalysing":
                raise ConflictError(f"drift alert {alert_id!r} is part of re-analysis {a.reanalysis_id} already",
                                    "see GET /api/reanalyses")
            self.policy.start_for_alert(s, a, after, why="operator: re-analyse anyway")
            view = alert_view(a)
        for fn in after:
            fn()
        self.events.publish("drift_alert", view)
        return view
