"""`toco demo --scenario sensors`: a regression model's fleet story as a user runs it.

Real server (embedded broker, SQLite), real agent processes, the real wear-estimator MLP; the test
reads what the server stored and the agents left on disk, not only what the demo printed. It runs
the demo as `make demo` does (no `--once`: the fleet stays up until a plain `kill`), which is the
embedded broker's and that mode's whole-story test.
"""

import json
import sqlite3

import pytest

from tests.support.demo_run import run_demo, run_demo_until_up_then_kill, unstopped_agents
from tests.support.processes import free_port

DEVICES = ("press-pc", "pump-box", "handheld")
STEPS = ("server up", "analysed", "regression metric", "agents online", "deployed to every agent",
         "clean traffic, no drift", "sensor drift detected")


@pytest.mark.timeout(600)
def test_sensor_scenario_deploys_a_regression_model_and_sees_the_sensor_fault(tmp_path):
    proc = run_demo_until_up_then_kill(tmp_path, "--scenario", "sensors", "--http-port", str(free_port()))
    # SIGTERM after "press Ctrl-C to stop": the demo stops its agents and server, says so, exits 130
    assert proc.returncode == 130 and "interrupted" in proc.stderr, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "the fleet keeps running; press Ctrl-C to stop" in proc.stdout
    out = proc.stdout
    for step in STEPS:
        assert f"done {step}" in out, step
    db = sqlite3.connect(tmp_path / "fleet" / "fleet.db")
    # the server analysed it as a regression: the settings it stored, and the metric the story printed
    (settings,) = db.execute("select settings from analyses").fetchone()
    assert json.loads(settings)["task"] == "regression"
    assert "a row agrees when |estimate - base| <= 0.1 x sigma" in out
    # every box derived and runs its own model of the one bundle, and reports its plan
    status = {d: json.loads((tmp_path / "agents" / d / "state" / "status.json").read_text()) for d in DEVICES}
    plans = {d: s["active"]["plan"]["label"] for d, s in status.items()}
    assert len({s["active"]["bundle_id"] for s in status.values()}) == 1
    assert f"{len(set(plans.values()))} different compressions on 3 boxes" in out
    words = " ".join(out.split())  # rich wraps long lines
    assert all(f"{d}: {p}" in words for d, p in plans.items()), plans
    # drift windows in the regression metric: every box shadowed the base and measured agreement
    points = {d: [json.loads(p) for (p,) in db.execute("select point from drift_reports where device_id = ?", (d,))]
              for d in DEVICES}
    for d, ps in points.items():
        shadowed = [p for p in ps if p["n_shadowed"] > 0 and p["agreement"] is not None]
        assert len(shadowed) >= 3, (d, ps)
    assert "drift windows on clean rows" in out
    # the faulty sensors: press-pc's input statistics left their band, and the server judged the alert
    shifted = [p for p in points["press-pc"] if "input_shift" in p["out_of_band"]]
    assert shifted, points["press-pc"]
    alerts = db.execute("select device_id, kind, status from drift_alerts").fetchall()
    assert [a[0] for a in alerts] == ["press-pc"], alerts
    kind, alert_status = alerts[0][1:]
    reanalyses = db.execute("select count(*) from reanalyses").fetchone()[0]
    if kind == "data":  # what the server decided on this model: new data, no re-analysis; the operator accepts
        assert alert_status == "accepted" and reanalyses == 0
        for step in ("new data, no re-analysis", "accepted as normal", "in band after the rebase"):
            assert f"done {step}" in out, step
    else:  # fidelity drift: the re-analysis and the redeploy to press-pc's group
        assert kind == "fidelity" and reanalyses == 1 and "done redeployed to the drifting group" in out
    assert all(not s["running"] for s in status.values()), "agents must shut down cleanly\n" + \
        unstopped_agents(tmp_path, status)


def test_an_unknown_scenario_is_refused_in_one_line(tmp_path):
    proc = run_demo(tmp_path / "demo", "--scenario", "turbines", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown scenario 'turbines'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "demo").exists()
