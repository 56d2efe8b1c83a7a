"""``toco demo --soak SECONDS``: after the story, keep every line's traffic (the rotated and the dimmed
camera included) running and check that the fleet has gone quiet.

It passes only if no re-analysis started during the soak and every box ended in band or with its
alerts acknowledged. Meanwhile the demo acts as an operator through the API: a data-drift alert is
accepted as normal, an escalated one (fidelity drift again on the bundle built for it) acknowledged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich import box
from rich.table import Table

from toco_cli.demo_fleet import DemoError, DemoFleet
from toco_core.cli_support import console

CLOSED = ("accepted", "acknowledged")


@dataclass
class SoakResult:
    """What the soak saw: the re-analyses it started, the operator's actions, each box's final state."""

    seconds: float
    started: list[dict] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    boxes: dict[str, dict] = field(default_factory=dict)

    @property
    def quiet(self) -> bool:
        """No re-analysis started and every box in band or acknowledged."""
        return not self.started and all(b["ok"] for b in self.boxes.values())


def _operate(fleet: DemoFleet, result: SoakResult) -> None:
    """Act on active alerts as an operator would (see the module docstring)."""
    for a in fleet.call("GET", "/api/drift-alerts", params={"active": "true"}):
        if a["kind"] == "data" and "accept" in a["actions"]:
            fleet.call("POST", f"/api/drift-alerts/{a['alert_id']}/accept", json={"scope": "device"})
            result.actions.append(f"{a['device_id']}: accepted new data ({a['why']})")
        elif a["status"] in ("escalated", "held"):
            fleet.call("POST", f"/api/drift-alerts/{a['alert_id']}/acknowledge")
            result.actions.append(f"{a['device_id']}: acknowledged {a['status']} alert ({a['decision']})")


def _final(fleet: DemoFleet, device_id: str, view: dict) -> dict:
    alerts = fleet.call("GET", "/api/drift-alerts", params={"device_id": device_id})
    latest = alerts[0] if alerts else None
    last = view.get("last_drift") or {}
    in_band = not view.get("alert")
    acknowledged = latest is not None and latest["status"] in CLOSED and not view.get("drift_kind")
    return {"window": last.get("window"), "out_of_band": ", ".join(last.get("out_of_band") or []) or "-",
            "alert": "ALERT" if view.get("alert") else "in band", "kind": view.get("drift_kind") or "-",
            "latest": f"{latest['kind']} {latest['status']}" if latest else "-", "ok": in_band or acknowledged}


def soak(fleet: DemoFleet, seconds: float, step: float = 2.0) -> SoakResult:
    """Run ``seconds`` more with the traffic flowing; returns what happened (see SoakResult)."""
    before = {r["reanalysis_id"] for r in fleet.call("GET", "/api/reanalyses")}
    result = SoakResult(seconds)
    end = time.monotonic() + seconds
    with console.status("soak") as status:
        while (left := end - time.monotonic()) > 0:
            _operate(fleet, result)
            started = [r for r in fleet.call("GET", "/api/reanalyses") if r["reanalysis_id"] not in before]
            status.update(f"soak: {left:.0f} s left, {len(started)} re-analyses started, "
                          f"{len(result.actions)} operator actions")
            time.sleep(min(step, max(left, 0)))
    result.started = [r for r in fleet.call("GET", "/api/reanalyses") if r["reanalysis_id"] not in before]
    result.boxes = {d["device_id"]: _final(fleet, d["device_id"], d) for d in fleet.call("GET", "/api/devices")}
    return result


def soak_table(result: SoakResult) -> Table:
    """The soak's summary: re-analyses started, and each box's final drift state."""
    rate = len(result.started) * 3600.0 / max(result.seconds, 1e-9)
    t = Table(title=f"soak: {result.seconds:.0f} s, {len(result.started)} re-analyses started ({rate:.0f} per hour), "
                    f"{len(result.actions)} operator actions", box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("box", "last window", "drift", "out of band", "alert kind", "latest alert", "ok"):
        t.add_column(col)
    for device_id, b in sorted(result.boxes.items()):
        t.add_row(device_id, str(b["window"]), b["alert"], b["out_of_band"], b["kind"], b["latest"],
                  "yes" if b["ok"] else "NO")
    return t


def check(result: SoakResult) -> None:
    """Raises DemoError unless the soak was quiet (no re-analysis, every box in band or acknowledged)."""
    if result.started:
        raise DemoError(f"{len(result.started)} re-analyses started during the soak: "
                        + "; ".join(f"{r['reanalysis_id']}: {r['why']}" for r in result.started))
    bad = [k for k, b in result.boxes.items() if not b["ok"]]
    if bad:
        raise DemoError(f"boxes still alerting after the soak without an operator's decision: {', '.join(bad)}")
