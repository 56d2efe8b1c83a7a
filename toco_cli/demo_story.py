"""The demo story, step by step, through the fleet server's public HTTP API.

analyse once -> three agents derive three models -> live traffic -> one camera's inputs
rotate -> its drift alert -> re-analysis with its field samples -> redeploy to its group.
Each step either happens within its time limit or raises DemoError naming the step, so
``toco demo --once`` exits 0 only when the whole story happened.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from rich import box
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from toco_cli.demo_fleet import CAMERA, SHIFTED, DemoDevice, DemoError, DemoFleet, wait_for
from toco_cli.demo_traffic import Traffic
from toco_core.cli_support import console
from toco_core.messages import PlanSummary
from toco_core.probe import probe_device
from toco_core.units import format_size, parse_size

SHIFT_KIND = "rotate"
DATA_SHIFT_KIND = "dim"  # the base and its compressions agree on dimmed digits: data drift, not fidelity


@dataclass
class StoryLog:
    """What happened, for the summary and for ``--once``'s exit code."""

    steps: list[str] = field(default_factory=list)
    analysis_id: str = ""
    bundle_id: str = ""
    reanalysis: dict = field(default_factory=dict)

    def done(self, step: str, detail: str = "") -> None:
        """Record a finished step and print it."""
        self.steps.append(step)
        console.print(f"[green]done[/green] {step}" + (f": {detail}" if detail else ""))


def register_and_analyse(fleet: DemoFleet, model: Path, x_pool: np.ndarray, y_pool: np.ndarray,
                         log: StoryLog, timeout: float = 900, task: str | None = None, what: str = "digits") -> dict:
    """POST the model with its pool (``what`` names its samples), start the analysis (``task``: its task kind,
    None: detected) and follow its progress. Returns the Analysis.

    Raises DemoError when the server refuses the model or the analysis fails or times out.
    """
    buf = io.BytesIO()
    np.savez(buf, x=x_pool, y=y_pool)
    m = fleet.call("POST", "/api/models", files={"file": (model.name, model.read_bytes()),
                                                 "pool": ("pool.npz", buf.getvalue())}, data={"name": model.stem})
    ask = {"budget": 0.01, **({"task": task} if task else {})}
    a = fleet.call("POST", f"/api/models/{m['model_id']}/analyses", json=ask)
    log.done("model registered", f"{m['name']}: {m['weights']:,} weights, pool of {m['pool_size']} {what}")
    a = follow_analysis(fleet, a["analysis_id"], timeout)
    log.analysis_id, log.bundle_id = a["analysis_id"], a["bundle_id"]
    log.done("analysed", f"analysis {a['analysis_id']} -> signed bundle {a['bundle_id'][:12]}")
    return a


def follow_analysis(fleet: DemoFleet, analysis_id: str, timeout: float) -> dict:
    """Show an analysis's phases as progress bars until it is done. Returns it; raises DemoError."""
    end = time.monotonic() + timeout
    with Progress(TextColumn("  {task.description:18s}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        tasks: dict[str, TaskID] = {}
        while True:
            a = fleet.call("GET", f"/api/analyses/{analysis_id}")
            p = a["progress"]
            if p["phase"] and p["total"] and p["phase"] != "done":
                if p["phase"] not in tasks:
                    tasks[p["phase"]] = bar.add_task(p["phase"], total=p["total"])
                bar.update(tasks[p["phase"]], completed=p["done"], total=p["total"])
            if a["status"] == "done":
                for task in bar.tasks:
                    bar.update(task.id, completed=task.total)
                return a
            if a["status"] == "failed":
                raise DemoError(f"analysis {analysis_id} failed: {a['error']}")
            if time.monotonic() > end:
                raise DemoError(f"analysis {analysis_id} did not finish within {timeout:.0f} s",
                                "the machine may be very busy; see the server's log")
            time.sleep(0.5)


def devices(fleet: DemoFleet) -> dict[str, dict]:
    """GET /api/devices, keyed by device id."""
    return {d["device_id"]: d for d in fleet.call("GET", "/api/devices")}


def size_camera_box(fleet: DemoFleet, analysis_id: str, budget: float = 0.01) -> DemoDevice:
    """Give the camera box the model storage at which it gets a model of its own. Returns that box.

    The what-if (a box like this one: its probed formats and memory) gives the line PC's and the
    handheld's plans; the camera's storage is the largest whole KB below the line PC's plan at
    which its best plan is a third one. Sets ``fleet.devices``; raises DemoError when no such
    size exists (the analysis offers fewer than three plans within the budget).
    """
    here = probe_device(fleet.workdir, benchmark=False, device_id="demo").model_dump(mode="json")

    def best_plan(device: DemoDevice, storage: int | None = None) -> PlanSummary | None:
        limits = {"memory": parse_size(device.memory_cap) if device.memory_cap else None, "storage": storage}
        ask = {"profile": here, "budget": budget, "objective": device.objective,
               **{k: v for k, v in limits.items() if v is not None}}
        plan = fleet.call("POST", f"/api/analyses/{analysis_id}/whatif", json=ask)["plan"]
        return None if plan is None else PlanSummary.model_validate(plan)

    others = {d.device_id: best_plan(d) for d in fleet.devices if d.device_id != CAMERA}
    if None in others.values():
        missing = sorted(k for k, v in others.items() if not v)
        raise DemoError(f"the what-if finds no plan within {budget:.0%} for {missing}")
    plans = {k: v for k, v in others.items() if v is not None}  # all of them (checked above)
    taken = {p.label for p in plans.values()}
    camera = next(d for d in fleet.devices if d.device_id == CAMERA)
    shifted_bytes = plans[SHIFTED].predicted_storage_bytes
    if shifted_bytes is None:
        raise DemoError("the what-if gave the line PC's plan no storage size")
    for kb in range((shifted_bytes - 1) // 1000, 0, -1):
        plan = best_plan(camera, kb * 1000)
        if plan is None:
            break
        if plan.label not in taken:
            role = f"{camera.role}, {kb} KB model storage"
            camera = replace(camera, storage_cap=f"{kb}KB", role=role)
            fleet.devices = tuple(camera if d.device_id == CAMERA else d for d in fleet.devices)
            return camera
    raise DemoError(f"no model storage below the line PC's plan gives the camera box a third plan (plans: {taken})",
                    "the analysis offers too few plans within the budget; try a larger one")


def start_agents(fleet: DemoFleet, log: StoryLog, timeout: float = 120) -> None:
    """Start the agent processes and wait until the server saw every one's birth. Raises DemoError."""
    fleet.start_agents()

    def all_online():
        for a in fleet.agents.values():
            if not a.alive():
                raise DemoError(f"agent {a.device.device_id} exited with {a.proc.returncode}: {a.log_tail(3)}",
                                f"see {a.log_path}")
        seen = devices(fleet)
        return all(seen.get(d.device_id, {}).get("online") for d in fleet.devices)

    with console.status("waiting for the agents' births on the broker"):
        wait_for("every agent coming online", all_online, timeout)
    for d in fleet.devices:
        console.print(f"  {d.device_id:11s} group {d.group:10s} {d.role}")
    log.done("agents online", f"{len(fleet.devices)} real agent processes on the broker")


def deploy_and_wait(fleet: DemoFleet, analysis_id: str, target: dict, expect: list[str], log: StoryLog,
                    step: str, timeout: float = 600) -> dict:
    """Create a staged deployment and wait until every expected device runs it. Returns the Deployment.

    Raises DemoError when a device fails (with its reason), the rollout stops, or time runs out.
    """
    dep = fleet.call("POST", "/api/deployments", json={"analysis_id": analysis_id, "target": target})
    return follow_deployment(fleet, dep["deployment_id"], expect, log, step, timeout)


def follow_deployment(fleet: DemoFleet, deployment_id: str, expect: list[str], log: StoryLog, step: str,
                      timeout: float = 600) -> dict:
    """Wait for a deployment to reach every device in ``expect`` (showing phases). Raises DemoError."""
    def finished():
        dep = fleet.call("GET", f"/api/deployments/{deployment_id}")
        failed = [f"{m['device_id']}: {m['reason'] or m['phase']}" for m in dep["devices"] if m["outcome"] == "failed"]
        if failed or dep["stage"] == "stopped":
            raise DemoError(f"deployment {deployment_id} failed on " + "; ".join(failed or ["(stopped)"]),
                            "see the agents' logs under the demo workdir")
        phases = ", ".join(f"{m['device_id']} {m['phase']}" for m in dep["devices"])
        status.update(f"deployment {deployment_id} ({dep['stage']}): {phases}")
        ok = {m["device_id"] for m in dep["devices"] if m["outcome"] == "succeeded"}
        return dep if ok >= set(expect) else None

    with console.status(f"deployment {deployment_id}") as status:
        dep = wait_for(f"deployment {deployment_id} reaching {', '.join(expect)}", finished, timeout, step=1.0)
    log.done(step, f"deployment {deployment_id} active on {', '.join(expect)}")
    return dep


def check_plans_differ(fleet: DemoFleet, log: StoryLog) -> None:
    """Every agent derived its own model: the plan labels must be pairwise different. Raises DemoError."""
    seen = devices(fleet)
    plans = {d.device_id: (seen[d.device_id].get("active") or {}).get("plan_label") for d in fleet.devices}
    if None in plans.values() or len(set(plans.values())) < len(plans):
        raise DemoError(f"the agents did not derive different models: {plans}")
    console.print(plans_table(fleet, "one analysis, three devices, three models"))
    log.done("three different compressions", "; ".join(f"{k}: {v}" for k, v in plans.items()))


def clean_traffic(fleet: DemoFleet, traffic: dict[str, Traffic], log: StoryLog, windows: int = 2,
                  timeout: float = 240) -> None:
    """Wait until every device reported ``windows`` drift windows on clean digits, none alerting."""
    start = {k: (v.get("last_drift") or {}).get("window", -1) for k, v in devices(fleet).items()}

    def enough():
        seen = devices(fleet)
        for d in fleet.devices:
            last = seen[d.device_id].get("last_drift") or {}
            if last.get("alert"):
                raise DemoError(f"{d.device_id} raised a drift alert on clean held-out digits: "
                                f"{last.get('out_of_band')}",
                                "the drift bands are too narrow for this model; see docs/ops.md")
        progress = {d.device_id: ((seen[d.device_id].get("last_drift") or {}).get("window", -1)
                                  - start.get(d.device_id, -1))
                    for d in fleet.devices}
        status.update("clean traffic, drift windows so far: " + ", ".join(f"{k} {v}" for k, v in progress.items()))
        return all(v >= windows for v in progress.values())

    with console.status("clean traffic") as status:
        wait_for(f"{windows} drift windows per device on clean digits", enough, timeout, step=1.0)
    sent = sum(t.sent for t in traffic.values())
    log.done("clean traffic, no drift", f"{sent} inferences, every device in band")


def shift_until_redeploy(fleet: DemoFleet, traffic: dict[str, Traffic], log: StoryLog, timeout: float = 900) -> dict:
    """Rotate the camera's digits; wait for its alert, the re-analysis and the redeploy. Returns the re-analysis."""
    traffic[SHIFTED].shift(SHIFT_KIND)
    console.print(f"  {SHIFTED}'s camera is knocked: its digits now arrive rotated by 90 degrees")
    with console.status(f"waiting for {SHIFTED}'s drift alert"):
        point = wait_for(f"a drift alert from {SHIFTED}", lambda: _alert(fleet), 300, step=1.0)
    log.done("drift alert", f"{SHIFTED}: {', '.join(point.get('out_of_band') or [])} out of band, "
                            f"agreement {pct(point.get('agreement'))}")
    alert = wait_for(f"the server's verdict on {SHIFTED}'s alert", lambda: _classified(fleet, SHIFTED), 120, step=1.0)
    console.print(f"  the server calls it {alert['kind']} drift: {alert['decision']}")
    if alert["kind"] != "fidelity" and alert["status"] != "reanalysing":
        # the base model itself is unsure of rotated digits: the operator decides to re-analyse anyway
        fleet.call("POST", f"/api/drift-alerts/{alert['alert_id']}/reanalyse")
        console.print("  the operator re-analyses anyway (POST /api/drift-alerts/{id}/reanalyse)")

    def reanalysis():
        rs = [r for r in fleet.call("GET", "/api/reanalyses") if SHIFTED in r["trigger_devices"]]
        if rs and rs[0]["status"] == "failed":
            raise DemoError(f"re-analysis {rs[0]['reanalysis_id']} failed: {rs[0]['why']}")
        if rs:
            status.update(f"re-analysis {rs[0]['reanalysis_id']}: {rs[0]['status']}")
        return rs[0] if rs and rs[0]["status"] == "deployed" else None

    with console.status("re-analysis with the field samples") as status:
        r = wait_for("the re-analysis and its redeploy", reanalysis, timeout, step=1.0)
    a = fleet.call("GET", f"/api/analyses/{r['analysis_id']}")
    log.done("re-analysed with field samples", f"{a['field_samples']} field samples from {SHIFTED}; {r['why']}")
    group = next(d.group for d in fleet.devices if d.device_id == SHIFTED)
    expect = [d.device_id for d in fleet.devices if d.group == group]
    follow_deployment(fleet, r["deployment_id"], expect, log, "redeployed to the drifting group")
    log.reanalysis = r
    return r


def _classified(fleet: DemoFleet, device_id: str) -> dict | None:
    """The device's newest active drift alert once the server has classified it (None before)."""
    alerts = fleet.call("GET", "/api/drift-alerts", params={"device_id": device_id, "active": "true"})
    return next((a for a in alerts if a["status"] != "classifying"), None)


def new_data(fleet: DemoFleet, traffic: dict[str, Traffic], log: StoryLog, timeout: float = 300) -> dict:
    """The camera box's lighting fails (dim digits): the server raises "new data" and starts no
    re-analysis; the operator accepts the data as normal (the box rebases its reference). Returns the alert.

    Raises DemoError when the alert does not come, is not data drift, or a re-analysis starts.
    """
    before = len(fleet.call("GET", "/api/reanalyses"))
    traffic[CAMERA].shift(DATA_SHIFT_KIND)
    console.print(f"  {CAMERA}'s lighting fails: its digits arrive dimmed to 35% (the base model never saw such)")
    with console.status(f"waiting for {CAMERA}'s drift alert"):
        alert = wait_for(f"a drift alert from {CAMERA}", lambda: _classified(fleet, CAMERA), timeout, step=1.0)
    if alert["kind"] != "data":
        raise DemoError(f"{CAMERA}'s dimmed inputs were judged {alert['kind']} drift: {alert['why']}")
    if len(fleet.call("GET", "/api/reanalyses")) != before:
        raise DemoError(f"a re-analysis started for {CAMERA}'s new data", "data drift must wait for the operator")
    log.done("new data, no re-analysis", f"{CAMERA}: {alert['why']}")
    fleet.call("POST", f"/api/drift-alerts/{alert['alert_id']}/accept", json={"scope": "device"})
    log.done("accepted as normal", f"the operator accepted {CAMERA}'s new data; it rebases its drift reference")
    return alert


def _alert(fleet: DemoFleet) -> dict | None:
    d = devices(fleet).get(SHIFTED) or {}
    return d.get("last_drift") if d.get("alert") else None


def pct(v) -> str:
    """A share as a percentage with one decimal, "-" for None."""
    return "-" if v is None else f"{v:.1%}"


def plans_table(fleet: DemoFleet, title: str) -> Table:
    """Device, plan, storage form vs base, bytes the box downloaded for it and its state dir, drift shadow,
    predicted vs self-tested agreement, live agreement, drift state, bundle."""
    seen = devices(fleet)
    t = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("device", "plan", "storage form", "vs base", "downloaded", "state dir", "shadow", "predicted",
                "measured", "live", "drift", "bundle"):
        t.add_column(col, justify="left" if col in ("device", "plan", "shadow", "drift", "bundle") else "right",
                     no_wrap=col != "plan")
    size_or_dash = lambda v: format_size(v) if v else "-"  # noqa: E731
    for d in fleet.devices:
        v = seen.get(d.device_id, {})
        a = v.get("active") or {}
        last = v.get("last_drift") or {}
        size, base = a.get("storage_bytes"), a.get("base_file_bytes")
        t.add_row(d.device_id, a.get("plan_label") or "-", size_or_dash(size),
                  f"{base / size:.1f}x" if size and base else "-",
                  size_or_dash(a.get("download_bytes")), size_or_dash(a.get("state_dir_bytes")), a.get("shadow") or "-",
                  pct(a.get("predicted_agreement")), pct(a.get("measured_agreement")), pct(last.get("agreement")),
                  "ALERT" if v.get("alert") else ("in band" if last else "-"), (a.get("bundle_id") or "-")[:6])
    return t


def print_token(fleet: DemoFleet) -> None:
    """Print the demo's admin API token and how to use it (the CLI's variable, the dashboard's login)."""
    console.print(f"admin API token (log in to the dashboard with it): {fleet.token}", highlight=False, soft_wrap=True)
    console.print(f"  export TOCO_FLEET_TOKEN={fleet.token} TOCO_FLEET_URL={fleet.url}", highlight=False,
                  soft_wrap=True)
