"""Model versions against a real server and mosquitto, with SimDevices: a second upload under a name
is v2 of it (its bundles signed under v1's lineage id, sequences above v1's); a group takes v2 staged,
the overview shows which version each group and device runs, and one request rolls the group back
to v1 through signed rollback commands naming v1's bundle, staged the same way. Drift history
filters by version."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fleet_server.cli import app
from fleet_server.enrollment import enroll
from tests.fleet.conftest import Fleet, SimDevice, device_json, succeed, wait_until
from toco_core.messages import DeployCommand, RollbackCommand

pytestmark = pytest.mark.parametrize("fleet", ["mosquitto"], indirect=True)


@pytest.fixture
def v2(fleet, lenet) -> dict:
    """v2 of the fleet's lenet5 (the same ONNX uploaded again under its name), analysed once per fleet."""
    if not hasattr(fleet, "v2"):
        model, analysis = fleet.add_and_analyse(lenet)
        fleet.v2 = {"model": model, "analysis": analysis}
    return fleet.v2


def newest_bundle(fleet: Fleet, model_id: str) -> str:
    """The newest bundle of a model version (what a rollback to it deploys): the fleet fixture is shared,
    so earlier tests' re-analyses may have made bundles after the fixture's own analysis."""
    done = [a for a in fleet.api.get("/api/analyses").json() if a["model_id"] == model_id and a["bundle_id"]]
    return max(done, key=lambda a: a["finished_at"] or 0)["bundle_id"]


def bundle_manifest(fleet: Fleet, bundle_id: str) -> dict:
    """The signed manifest the server stored for ``bundle_id``."""
    import json

    return json.loads(fleet.server.store.bundle_path(bundle_id).with_suffix(".manifest.json").read_text())


def test_a_second_model_under_the_same_name_is_its_next_version(fleet, v2):
    v1_id = fleet.analysis["model_id"]
    model = v2["model"]
    assert model["name"] == "lenet5" and model["version"] == 2
    assert model["parent_id"] == v1_id and model["lineage_id"] == v1_id and model["model_id"] != v1_id
    assert v2["analysis"]["status"] == "done"
    old, new = bundle_manifest(fleet, fleet.analysis["bundle_id"]), bundle_manifest(fleet, v2["analysis"]["bundle_id"])
    # one lineage for anti-rollback: v2's bundle counts on from v1's under v1's id
    assert new["model_id"] == old["model_id"] == v1_id and new["sequence"] > old["sequence"]
    out = CliRunner(env={"TOCO_FLEET_TOKEN": fleet.token}).invoke(app, ["models", "list", "--server", fleet.http.url])
    assert out.exit_code == 0 and "v2" in out.output and "v1" in out.output


def answer_rollbacks(devs: list[SimDevice], answered: set) -> None:
    """Play the agent's part for rollback commands naming a bundle: report the bundle active."""
    for dev in devs:
        for cmd in list(dev.commands):
            if isinstance(cmd, RollbackCommand) and cmd.cmd_id not in answered:
                answered.add(cmd.cmd_id)
                succeed(dev, cmd)


def group_rows(fleet: Fleet, group: str) -> dict:
    """{version: devices} of ``group`` on the overview's versions-per-group table."""
    return {r["version"]: r["devices"] for r in fleet.api.get("/api/groups/versions").json() if r["group"] == group}


def test_a_version_rolled_out_staged_to_a_group_and_rolled_back_with_one_command(fleet, devices, v2):
    group = "ver-line"
    devs = [devices(f"ver-{i}", group=group, responder=succeed) for i in range(4)]
    # allowed the model by its v1 id: every version of it (the group rollouts below reach all four)
    enroll(fleet.server.db, "ver-3", group, allowed_models=[fleet.analysis["model_id"]])
    assert wait_until(lambda: sum(d["group"] == group and d["online"]
                                  for d in fleet.api.get("/api/devices").json()) == 4)

    def deploy(analysis_id: str) -> dict:
        dep = fleet.api.post("/api/deployments", json={"analysis_id": analysis_id, "target": {"group": group},
                                                       "canary_share": 0.25}).json()
        assert dep["stage"] == "canary" and dep["counts"]["pending"] == 3  # staged: one canary first
        assert wait_until(lambda: fleet.api.get(f"/api/deployments/{dep['deployment_id']}").json()["stage"] == "done")
        return dep

    deploy(fleet.analysis["analysis_id"])
    assert wait_until(lambda: group_rows(fleet, group) == {1: 4})
    deploy(v2["analysis"]["analysis_id"])
    assert wait_until(lambda: group_rows(fleet, group) == {2: 4})
    overview = {d["device_id"]: d for d in fleet.api.get("/api/devices").json()}
    assert overview["ver-0"]["model_version"] == {"model_id": v2["model"]["model_id"], "name": "lenet5", "version": 2}
    assert device_json(fleet, "ver-1")["model_version"]["version"] == 2

    # one command: back to v1's newest bundle, staged, through rollback commands naming it
    out = CliRunner(env={"TOCO_FLEET_TOKEN": fleet.token}).invoke(app, ["models", "rollback", "lenet5",
                                                                        "--group", group, "--canary", "0.25",
                                                                        "--server", fleet.http.url])
    assert out.exit_code == 0, out.output
    assert "from lenet5 v2 to v1" in out.output
    dep = next(d for d in fleet.api.get("/api/deployments").json() if d["command"] == "rollback")
    v1_bundle = newest_bundle(fleet, fleet.analysis["model_id"])
    assert dep["bundle_id"] == v1_bundle and dep["target"] == {"group": group}
    assert dep["counts"]["pending"] == 3
    answered: set = set()
    url = f"/api/deployments/{dep['deployment_id']}"

    def finished() -> bool:
        answer_rollbacks(devs, answered)
        return fleet.api.get(url).json()["stage"] == "done"

    assert wait_until(finished, timeout=20)
    assert len(answered) == 4
    sent = [c for d in devs for c in d.commands if isinstance(c, RollbackCommand)]
    assert {c.bundle_id for c in sent} == {v1_bundle}
    assert all(c.signature and c.deployment_id == dep["deployment_id"] for c in sent)
    assert sum(isinstance(c, DeployCommand) for d in devs for c in d.commands) == 8  # two rollouts, nothing more
    assert wait_until(lambda: group_rows(fleet, group) == {1: 4})

    # a group already at v1 has nothing before it: one clear line, non-zero exit
    out = CliRunner(env={"TOCO_FLEET_TOKEN": fleet.token}).invoke(app, ["models", "rollback", "lenet5",
                                                                        "--group", group, "--server", fleet.http.url])
    assert out.exit_code != 0 and "no previous version" in out.output


def test_drift_history_is_kept_per_version(fleet, devices, v2):
    dev = devices("ver-drift", group="ver-drift")
    assert wait_until(lambda: device_json(fleet, "ver-drift").get("online"))
    dev.drift(1, fleet.analysis["bundle_id"], alert=False)
    dev.drift(2, v2["analysis"]["bundle_id"], alert=False)
    dev.drift(3, v2["analysis"]["bundle_id"], alert=False)
    assert wait_until(lambda: len(fleet.api.get("/api/drift?device_id=ver-drift").json()) == 3)

    def windows(model_id: str) -> list[int]:
        points = fleet.api.get(f"/api/drift?device_id=ver-drift&model_id={model_id}").json()
        return [p["window"] for p in points]

    assert windows(fleet.analysis["model_id"]) == [1]
    assert windows(v2["model"]["model_id"]) == [2, 3]
    out = CliRunner(env={"TOCO_FLEET_TOKEN": fleet.token}).invoke(app, ["drift", "--device", "ver-drift",
                                                                        "--model", "lenet5", "--version", "2",
                                                                        "--server", fleet.http.url])
    assert out.exit_code == 0 and "ver-drift" in out.output
    out = CliRunner(env={"TOCO_FLEET_TOKEN": fleet.token}).invoke(app, ["drift", "--model", "lenet5", "--version", "7",
                                                                        "--server", fleet.http.url])
    assert out.exit_code != 0 and "no version v7" in out.output


def test_a_real_agent_takes_v2_refuses_v1_as_a_downgrade_and_rolls_back_to_it_on_the_signed_command(
        fleet, v2, tmp_path):
    from tests.agent_e2e.conftest import AgentProcess

    group, device = "ver-agents", "ver-agent"
    enroll(fleet.server.db, device, group)
    agent = AgentProcess(tmp_path, device, fleet.server.broker_url, fleet.server.public_key_path)
    agent.config.write_text(agent.config.read_text().replace('fleet = "e2e"', 'fleet = "test"'))  # this fleet's topics
    agent.start()
    try:
        def run(body: dict, path: str = "/api/deployments") -> dict:
            r = fleet.api.post(path, json=body)
            assert r.status_code == 200, r.text
            dep_id = r.json()["deployment_id"]
            assert wait_until(lambda: fleet.api.get(f"/api/deployments/{dep_id}").json()["stage"] in
                              ("done", "stopped"), timeout=120, step=0.5), agent.log_text()
            return fleet.api.get(f"/api/deployments/{dep_id}").json()

        for analysis in (fleet.analysis, v2["analysis"]):
            dep = run({"analysis_id": analysis["analysis_id"], "target": {"group": group}})
            assert dep["counts"]["succeeded"] == 1, (dep, agent.log_text())
        assert wait_until(lambda: group_rows(fleet, group) == {2: 1})
        # v1's bundle has the lower sequence of the lineage: a plain deployment of it is refused
        dep = run({"analysis_id": fleet.analysis["analysis_id"], "target": {"device": device}})
        assert dep["counts"]["failed"] == 1 and dep["devices"][0]["reason"].startswith("downgrade"), dep
        dep = run({"name": "lenet5", "group": group}, "/api/models/rollback")
        assert dep["command"] == "rollback" and dep["counts"]["succeeded"] == 1, (dep, agent.log_text())
        assert wait_until(lambda: group_rows(fleet, group) == {1: 1})
        assert agent.get("/v1/ready")[1]["model_version"].startswith(newest_bundle(fleet, fleet.analysis["model_id"]))
    finally:
        agent.stop()
