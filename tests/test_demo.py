"""`toco demo`: the whole digits story as a user runs it, on mosquitto.

Real server, real agent processes, real MNIST digits; the test reads what the agents left on
disk, not only what the demo printed. The embedded broker and `make demo`'s stay-up-until-killed
mode are covered by tests/test_demo_sensors.py on the shorter sensor story, so the suite runs
the digits story once.
"""

import json

import pytest

from tests.support.broker import Broker
from tests.support.demo_run import run_demo, unstopped_agents

STEPS = ("server up", "analysed", "agents online", "deployed to every agent", "three different compressions",
         "clean traffic, no drift", "drift alert", "re-analysed with field samples", "redeployed to the drifting group",
         "new data, no re-analysis", "accepted as normal")
SOAK_S = 45  # the rotated line PC's ~2.6 s windows: with the story's, 20+ windows on the shifted inputs


def agent_status(workdir, device: str) -> dict:
    return json.loads((workdir / "agents" / device / "state" / "status.json").read_text())


@pytest.mark.timeout(1300)
def test_demo_runs_the_whole_fleet_story(tmp_path):
    """`--once` on mosquitto, with a soak after the story: the drift it caused stays converged."""
    mosq = Broker()
    mosq.start()
    try:
        proc = run_demo(tmp_path, "--http-port", "0", "--broker", mosq.url, "--soak", str(SOAK_S))
    finally:
        mosq.stop()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    # the persistent rotation and the dimmed camera kept going: exactly one re-analysis, then quiet
    assert "done soak: quiet" in proc.stdout and f"soak: {SOAK_S} s, 0 re-analyses started" in proc.stdout
    for step in STEPS:
        assert f"done {step}" in proc.stdout, step
    assert "dashboard: http://127.0.0.1:" in proc.stdout
    assert "export TOCO_FLEET_TOKEN=toco_" in proc.stdout
    status = {d: agent_status(tmp_path, d) for d in ("line-pc", "camera-box", "handheld")}
    plans = {d: s["active"]["plan"]["label"] for d, s in status.items()}
    assert len(set(plans.values())) == 3, plans
    # the line PC's inputs rotated: it (alone, its group) runs the re-analysed bundle
    assert status["line-pc"]["active"]["bundle_id"] != status["camera-box"]["active"]["bundle_id"]
    assert status["handheld"]["active"]["bundle_id"] == status["camera-box"]["active"]["bundle_id"]
    assert all(not s["running"] for s in status.values()), "agents must shut down cleanly\n" + \
        unstopped_agents(tmp_path, status)
    # every box fetched the parts of its plan: fewer bytes than the fp32 model's bundle of old, and
    # the summary shows what it downloaded and what its state dir holds
    storage = {d: s["storage"] for d, s in status.items()}
    fp32 = status["handheld"]["active"]["plan"]["base_file_bytes"]
    assert all(0 < st["download_bytes"] < 2 * fp32 and st["state_dir_bytes"] > 0 for st in storage.values()), storage
    assert "downloaded" in proc.stdout and "state dir" in proc.stdout
    assert (tmp_path / "fleet" / "fleet.db").is_file()


def test_demo_refuses_a_bad_broker_url_in_one_line(tmp_path):
    proc = run_demo(tmp_path, "--http-port", "0", "--broker", "ftp://nowhere", timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "broker" in proc.stderr.lower() and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
