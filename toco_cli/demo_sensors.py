"""``toco demo --scenario sensors``: the fleet story with a model that is not a classifier.

A regression MLP estimates a machine's wear from 10 sensor readings (toco_core.demo.sensors). The
server analyses it once with ``task: regression``: a sample "agrees" when the compressed model's estimate
is within a tenth of the base output's spread (toco_core.task_kind). Three agents with different
budgets derive their own models, held-out rows flow into their inference APIs and each box's drift
windows report agreement in that metric (shadowing half the rows on the base). Then the press PC's
sensors drift (a gain and an offset on two readings) and the story reports what the server makes of
it: data drift (the operator accepts the new readings as the box's normal) or fidelity drift (the
server re-analyses with the box's field samples and redeploys to its group), whichever it decides.
"""

from __future__ import annotations

import time

import numpy as np
from rich import box
from rich.table import Table

from toco_cli import demo_story as story
from toco_cli.demo_fleet import DemoDevice, DemoError, DemoFleet, wait_for
from toco_cli.demo_traffic import Traffic
from toco_core.cli_support import console

# the digits story's three budgets on a machine line's sensor boxes. Every box keeps the master (the
# 4,800 fp32 weights are ~20 KB more to fetch), so every box shadows the base and reports its agreement
DEVICES = (
    DemoDevice("press-pc", "presses", "roomy press-line PC, no limits", threads=2, keep_master=True),
    DemoDevice("pump-box", "pumps", "256 MB pump monitor", memory_cap="256MB", keep_master=True),
    DemoDevice("handheld", "mobile", "64 MB one-core handheld, smallest model", memory_cap="64MB", objective="size",
               keep_master=True),
)
# the box whose sensors drift: the one without limits, so a re-analysis (should the server decide on one)
# can always find it a plan
FAULTY = "press-pc"
FAULT = "sensor-fault"


def shift_rows(x: np.ndarray, kind: str) -> np.ndarray:
    """The Traffic shifter of the scenario: ``sensor-fault`` readings (toco_core.demo.sensors.sensor_fault).

    Raises ValueError for another kind.
    """
    from toco_core.demo.sensors import sensor_fault

    if kind != FAULT:
        raise ValueError(f"unknown shift {kind!r}: the sensor scenario has {FAULT!r}")
    return sensor_fault(x)


def run(fleet: DemoFleet, log: story.StoryLog, traffic: dict[str, Traffic], rate: float) -> None:
    """Steps 2 to 7 of the scenario on a started server: takes the fleet, the story log, the dict it fills
    with each box's Traffic and the inferences per second each box gets. Raises DemoError for a missed step."""
    from toco_core.demo.sensors import FAULT_FEATURES, FAULT_GAIN, FAULT_OFFSET, regression_model, sensor_split

    fleet.devices = DEVICES
    console.rule("2. demo model: a wear estimate from 10 sensor readings (regression MLP 10-64-64-1)")
    model = fleet.workdir / "wear-estimator.onnx"
    regression_model(model)
    x_pool, y_pool, x_heldout, _ = sensor_split()
    console.print(f"  {len(x_pool)} rows for the server's pool, {len(x_heldout)} held out for the agents' traffic")
    console.rule("3. the server analyses it once with task: regression")
    analysis = story.register_and_analyse(fleet, model, x_pool, y_pool, log, task="regression",
                                          what="sensor rows")
    task = (fleet.call("GET", f"/api/analyses/{analysis['analysis_id']}")["manifest"] or {}).get("task") or {}
    if task.get("kind") != "regression":
        raise DemoError(f"the analysis ran as {task.get('kind') or 'a classifier'}, not as a regression")
    log.done("regression metric", f"a row agrees when |estimate - base| <= {task['tolerance']:g} x sigma "
                                  f"= {task['tolerance'] * task['scale']:.3f}, sigma = {task['scale']:.3f} being the "
                                  "base output's spread on the pool")
    console.rule("4. three edge agents with different budgets")
    story.start_agents(fleet, log)
    console.rule("5. deploy the bundle; every agent derives its own model")
    story.deploy_and_wait(fleet, analysis["analysis_id"], {"all": True}, [d.device_id for d in fleet.devices], log,
                          "deployed to every agent")
    report_plans(fleet, log)
    console.rule("6. live traffic: held-out sensor rows into every agent's inference API")
    for i, (name, agent) in enumerate(fleet.agents.items()):
        traffic[name] = Traffic(agent, x_heldout[i::len(fleet.devices)], rate=rate, shifter=shift_rows).start()
    story.clean_traffic(fleet, traffic, log)
    console.print(windows_table(fleet, "drift windows on clean rows (agreement = rows within tolerance of the base)"))
    console.rule(f"7. {FAULTY}'s sensors drift")
    traffic[FAULTY].shift(FAULT)
    console.print(f"  readings {', '.join(map(str, FAULT_FEATURES))} of {FAULTY} now read x {FAULT_GAIN:g} "
                  f"+ {FAULT_OFFSET:g} (a gain and an offset fault)")
    sensor_drift(fleet, log)


def report_plans(fleet: DemoFleet, log: story.StoryLog) -> None:
    """Every box reports the plan it derived; prints them and how many differ. Raises DemoError for a box
    without one.

    Unlike the digits story, no box gets a storage cap sized between two plans: this model's plans within
    the budget lie a few percent apart in storage, less than the solver's storage prediction undershoots
    the built form by (~8%), so a cap between them leaves the capped box no plan that fits.
    """
    seen = story.devices(fleet)
    plans = {d.device_id: (seen[d.device_id].get("active") or {}).get("plan_label") for d in fleet.devices}
    missing = sorted(k for k, v in plans.items() if v is None)
    if missing:
        raise DemoError(f"no plan reported by {', '.join(missing)}")
    console.print(story.plans_table(fleet, "one analysis, three devices, each deriving its own model"))
    log.done(f"{len(set(plans.values()))} different compressions on {len(plans)} boxes",
             "; ".join(f"{k}: {v}" for k, v in plans.items()))


def sensor_drift(fleet: DemoFleet, log: story.StoryLog, timeout: float = 240) -> dict:
    """Wait for the faulty box's alert and the server's verdict, then follow what the server does. Returns
    the alert.

    Data drift: no re-analysis may start; the operator accepts the readings as normal and the box must
    come back in band. Fidelity drift: the re-analysis with field samples and the redeploy to the box's
    group. Raises DemoError when the alert, the verdict or the follow-up does not come in time.
    """
    before = {r["reanalysis_id"] for r in fleet.call("GET", "/api/reanalyses")}
    with console.status(f"waiting for {FAULTY}'s drift alert and the server's verdict"):
        alert = wait_for(f"the server's verdict on a drift alert from {FAULTY}", lambda: _verdict(fleet), timeout,
                         step=1.0)
    point = story.devices(fleet)[FAULTY].get("last_drift") or {}
    log.done("sensor drift detected", f"{FAULTY}: server verdict {alert['kind']} drift; {alert['why']}")
    console.print(windows_table(fleet, f"drift windows once {FAULTY}'s sensors drifted"))
    console.print(f"  {FAULTY}'s last window: input shift {point.get('input_shift', 0):.2f}, "
                  f"agreement {story.pct(point.get('agreement'))}")
    if alert["kind"] == "data":
        started = [r for r in fleet.call("GET", "/api/reanalyses") if r["reanalysis_id"] not in before]
        if started:
            raise DemoError(f"a re-analysis started for {FAULTY}'s data drift", "data drift must wait for the operator")
        log.done("new data, no re-analysis", f"the compressed models still follow the base on {FAULTY}'s readings")
        fleet.call("POST", f"/api/drift-alerts/{alert['alert_id']}/accept", json={"scope": "device"})
        log.done("accepted as normal", f"the operator accepted {FAULTY}'s readings; it rebases its drift reference")
        _back_in_band(fleet, log, time.time())
    elif alert["kind"] == "fidelity":
        _reanalysed(fleet, log, before, timeout=600)
    else:
        raise DemoError(f"the server left {FAULTY}'s alert {alert['kind']}: {alert['why']}")
    return alert


def _verdict(fleet: DemoFleet) -> dict | None:
    alerts = fleet.call("GET", "/api/drift-alerts", params={"device_id": FAULTY, "active": "true"})
    return next((a for a in alerts if a["status"] != "classifying"), None)


def _back_in_band(fleet: DemoFleet, log: story.StoryLog, since: float, timeout: float = 120) -> None:
    """Wait for a window of the faulty box closed after ``since`` that is in band. Raises DemoError."""
    def in_band():
        points = fleet.call("GET", "/api/drift", params={"device_id": FAULTY, "limit": 5})
        return next((p for p in reversed(points) if p["t"] > since and not p["out_of_band"]), None)

    with console.status(f"waiting for {FAULTY} to come back in band on its rebased reference"):
        p = wait_for(f"an in-band window from {FAULTY} after the rebase", in_band, timeout, step=1.0)
    log.done("in band after the rebase", f"{FAULTY} window {p['window']}: input shift {p['input_shift']:.2f}, "
                                        f"agreement {story.pct(p['agreement'])}")


def _reanalysed(fleet: DemoFleet, log: story.StoryLog, before: set[str], timeout: float) -> None:
    """Follow the server's re-analysis of the faulty box's fidelity drift to its redeploy. Raises DemoError."""
    def deployed():
        rs = [r for r in fleet.call("GET", "/api/reanalyses")
              if FAULTY in r["trigger_devices"] and r["reanalysis_id"] not in before]
        if rs and rs[0]["status"] == "failed":
            raise DemoError(f"re-analysis {rs[0]['reanalysis_id']} failed: {rs[0]['why']}")
        return rs[0] if rs and rs[0]["status"] == "deployed" else None

    with console.status("re-analysis with the field samples"):
        r = wait_for("the re-analysis and its redeploy", deployed, timeout, step=1.0)
    log.done("re-analysed with field samples", r["why"])
    group = next(d.group for d in fleet.devices if d.device_id == FAULTY)
    story.follow_deployment(fleet, r["deployment_id"], [d.device_id for d in fleet.devices if d.group == group], log,
                            "redeployed to the drifting group")
    log.reanalysis = r


def _psi(point: dict) -> str:
    """The output-summary PSI of a drift point (older agents judged it under the entropy check's name)."""
    value = point.get("output_psi")
    value = point.get("entropy") if value is None else value
    return "-" if value is None else f"{value:.2f}"


def windows_table(fleet: DemoFleet, title: str, last: int = 3) -> Table:
    """Each box's newest ``last`` drift windows: rows, shadowed rows, agreement with the base in the
    regression metric against its band, input shift against its band, the output-summary PSI, and what
    was out of band."""
    t = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("device", "window", "rows", "shadowed", "agreement", "band low", "input shift", "band high",
                "output PSI", "out of band"):
        t.add_column(col, justify="left" if col in ("device", "out of band") else "right")
    for d in fleet.devices:
        for p in fleet.call("GET", "/api/drift", params={"device_id": d.device_id, "limit": last}):
            bands = p.get("bands") or {}
            low = (bands.get("agreement") or [None])[0]
            high = (bands.get("input_shift") or [None, None])[1]
            t.add_row(d.device_id, str(p["window"]), str(p["n_samples"]), str(p["n_shadowed"]),
                      story.pct(p["agreement"]), story.pct(low), f"{p['input_shift']:.2f}",
                      "-" if high is None else f"{high:.2f}", _psi(p),
                      ", ".join(p["out_of_band"]) or "-")
    return t
