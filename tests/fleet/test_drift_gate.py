"""Drift alerts of two kinds and the re-analysis gate, against a real server on a real mosquitto with
SimDevices: data drift raises an operator alert and no re-analysis; accepting it rebases the device
(a signed command); cooldown and the daily cap hold fidelity triggers; a group redeploy needs a quorum."""

from __future__ import annotations

import dataclasses
import time

import pytest
from sqlalchemy import update

from fleet_server.db import ReanalysisRow
from tests.fleet.conftest import device_json, succeed, wait_until
from toco_core.messages import DriftCheck, DriftMessage, RebaseDriftCommand

pytestmark = pytest.mark.parametrize("fleet", ["mosquitto"], indirect=True)


def window(dev, index: int, bundle_id: str, *, agreement: float, alert: bool, out=("input_shift",)) -> None:
    """Send one closed window: ``out`` checks out of band, agreement on 200 shadowed inputs."""
    agree_ok = agreement >= 0.97
    checks = [DriftCheck(name="agreement", value=agreement, reference=0.99, low=0.97, high=1.0, n=200,
                         in_band=agree_ok),
              *(DriftCheck(name=n, value=0.9, reference=0.0, low=0.0, high=0.3, n=256, in_band=not alert)
                for n in out if n != "agreement")]
    bad = [c.name for c in checks if c.in_band is False]
    dev.send(DriftMessage(device_id=dev.id, bundle_id=bundle_id, window_index=index, opened_at=time.time() - 5,
                          closed_at=time.time(), n_samples=256, n_shadowed=200, predicted_agreement=0.99,
                          measured_agreement=agreement, mean_confidence=0.6, mean_entropy=0.9, input_mean=0.1,
                          input_std=0.3, checks=checks, out_of_band=bad, consecutive_out_of_band=3 if alert else 0,
                          alert=alert))


def deployed_group(fleet, devices, group: str, n: int) -> list:
    """``n`` SimDevices in ``group`` running the fleet's analysed bundle."""
    devs = [devices(f"{group}-{i}", group=group, responder=succeed) for i in range(n)]
    assert wait_until(lambda: sum(d["group"] == group and d["online"]
                                  for d in fleet.api.get("/api/devices").json()) == n)
    dep = fleet.api.post("/api/deployments", json={"analysis_id": fleet.analysis["analysis_id"],
                                                   "target": {"group": group}}).json()
    assert wait_until(lambda: fleet.api.get(f"/api/deployments/{dep['deployment_id']}").json()["stage"] == "done")
    return devs


def alerts(fleet, device_id: str) -> list[dict]:
    return fleet.api.get("/api/drift-alerts", params={"device_id": device_id}).json()


def reanalyses(fleet, group: str) -> list[dict]:
    return [r for r in fleet.api.get("/api/reanalyses").json() if r["group"] == group]


def test_data_drift_alerts_the_operator_and_never_reanalyses_and_accepting_rebases_the_device(fleet, devices):
    bid = fleet.analysis["bundle_id"]
    (cam,) = deployed_group(fleet, devices, "g-data", 1)
    for i in range(24):  # a persistent input shift while the compressed model agrees with the base
        window(cam, i, bid, agreement=0.995, alert=i >= 2)
    assert wait_until(lambda: (device_json(fleet, cam.id).get("last_drift") or {}).get("window") == 23)
    (a,) = alerts(fleet, cam.id)
    assert a["kind"] == "data" and a["status"] == "open" and "new data" in a["why"]
    assert "no automatic re-analysis" in a["decision"] and len(a["evidence"]["windows"]) == 10
    assert a["actions"] == ["accept", "acknowledge", "reanalyse"] and "models add" in a["new_version"]
    assert reanalyses(fleet, "g-data") == []
    assert device_json(fleet, cam.id)["drift_kind"] == "data"
    # the operator accepts the new data as normal: a signed rebase-drift command, the alert closes
    done = fleet.api.post(f"/api/drift-alerts/{a['alert_id']}/accept", json={"scope": "device"}).json()
    assert done["status"] == "accepted" and done["actions"] == []
    assert wait_until(lambda: any(isinstance(c, RebaseDriftCommand) for c in cam.commands))
    cmd = next(c for c in cam.commands if isinstance(c, RebaseDriftCommand))
    assert cmd.reason == "accepted" and cmd.alert_id == a["alert_id"] and cmd.device_id == cam.id
    assert cmd.windows == 3  # the out-of-band streak: only windows of the new data go into the new reference
    assert cmd.signature and cmd.sequence and cmd.expires_at > time.time()
    view = device_json(fleet, cam.id)
    assert not view["alert"] and view["drift_kind"] is None
    assert fleet.api.post(f"/api/drift-alerts/{a['alert_id']}/accept").status_code == 409
    assert fleet.api.post("/api/drift-alerts/a-000000000000/acknowledge").status_code == 404
    window(cam, 24, bid, agreement=0.995, alert=True)  # opened before the rebase: judged on the old reference
    window(cam, 25, bid, agreement=0.995, alert=False)  # judged against the rebased reference on the box
    assert wait_until(lambda: device_json(fleet, cam.id)["last_drift"]["window"] == 25)
    assert [x["status"] for x in alerts(fleet, cam.id)] == ["accepted"] and reanalyses(fleet, "g-data") == []


def test_cooldown_and_daily_cap_hold_fidelity_triggers_and_the_operator_can_override(fleet, devices):
    policy, bid = fleet.server.policy, fleet.analysis["bundle_id"]
    saved = policy.mode, policy.gate
    policy.mode = "approval"  # nothing is analysed here: the gate's decisions are the subject
    policy.gate = dataclasses.replace(policy.gate, min_interval_s=3600, daily_cap=100)
    try:
        a, b, c = deployed_group(fleet, devices, "g-cool", 3)
        window(a, 1, bid, agreement=0.6, alert=True, out=("agreement",))
        assert wait_until(lambda: len(reanalyses(fleet, "g-cool")) == 1)
        (first,) = reanalyses(fleet, "g-cool")
        assert alerts(fleet, a.id)[0]["kind"] == "fidelity" and alerts(fleet, a.id)[0]["status"] == "reanalysing"
        with fleet.server.db.session(write=True) as s:  # it ran its course (the analysis is tested elsewhere)
            s.execute(update(ReanalysisRow).where(ReanalysisRow.id == first["reanalysis_id"]).values(status="failed"))
        window(b, 1, bid, agreement=0.6, alert=True, out=("agreement",))
        assert wait_until(lambda: bool(alerts(fleet, b.id)))
        held = alerts(fleet, b.id)[0]
        assert held["status"] == "held" and held["decision"].startswith("cooldown:") and "3600 s" in held["decision"]
        assert len(reanalyses(fleet, "g-cool")) == 1
        policy.gate = dataclasses.replace(policy.gate, min_interval_s=0, daily_cap=1)
        window(c, 1, bid, agreement=0.6, alert=True, out=("agreement",))
        assert wait_until(lambda: bool(alerts(fleet, c.id)))
        capped = alerts(fleet, c.id)[0]
        assert capped["status"] == "held" and capped["decision"].startswith("daily cap:")
        assert len(reanalyses(fleet, "g-cool")) == 1
        # re-analyse anyway: the operator overrides the cap
        over = fleet.api.post(f"/api/drift-alerts/{capped['alert_id']}/reanalyse").json()
        assert over["status"] == "reanalysing" and over["reanalysis_id"]
        assert [r["status"] for r in reanalyses(fleet, "g-cool")] == ["pending_approval", "failed"]
        assert "operator: re-analyse anyway" in reanalyses(fleet, "g-cool")[0]["why"]
    finally:
        policy.mode, policy.gate = saved


def test_one_device_of_five_redeploys_only_itself_three_of_five_redeploy_the_group(fleet, devices, lenet):
    policy, bid, aid = fleet.server.policy, fleet.analysis["bundle_id"], fleet.analysis["analysis_id"]
    saved = policy.gate
    policy.gate = dataclasses.replace(policy.gate, min_interval_s=0, daily_cap=100)
    try:
        devs = deployed_group(fleet, devices, "g-quorum", 5)
        window(devs[0], 1, bid, agreement=0.6, alert=True, out=("agreement",))
        assert wait_until(lambda: any(r["status"] == "canary" for r in reanalyses(fleet, "g-quorum")), timeout=150,
                          step=0.5)
        (r,) = reanalyses(fleet, "g-quorum")
        assert r["quorum"] == {"votes": 1, "online": 5, "needed": 3} and r["group_deployment_id"] is None
        canary = fleet.api.get(f"/api/deployments/{r['deployment_id']}").json()
        assert canary["target"] == {"devices": [devs[0].id]}
        new_bundle = canary["bundle_id"]
        assert wait_until(lambda: device_json(fleet, devs[0].id)["active"]["bundle_id"] == new_bundle)
        time.sleep(2 * fleet.server.settings.tick_s)
        assert reanalyses(fleet, "g-quorum")[0]["status"] == "canary"  # one of five: no group redeploy
        assert all(device_json(fleet, d.id)["active"]["bundle_id"] == bid for d in devs[1:])
        # two more devices of the group drift on the old bundle: they join as votes, and three of five is a quorum
        for d in devs[1:3]:
            window(d, 1, bid, agreement=0.6, alert=True, out=("agreement",))
        assert wait_until(lambda: reanalyses(fleet, "g-quorum")[0]["status"] == "deployed")
        (r,) = reanalyses(fleet, "g-quorum")
        assert r["quorum"]["votes"] == 3 and r["group_deployment_id"]
        assert wait_until(lambda: all(device_json(fleet, d.id)["active"]["bundle_id"] == new_bundle for d in devs))
        # every trigger device got one convergence rebase; a recurring trigger on the new bundle escalates
        assert wait_until(lambda: sorted(reanalyses(fleet, "g-quorum")[0]["rebased"]) == sorted(d.id for d in devs[:3]))
        window(devs[0], 5, new_bundle, agreement=0.6, alert=True, out=("agreement",))
        assert wait_until(lambda: alerts(fleet, devs[0].id)[0]["bundle_id"] == new_bundle)
        assert alerts(fleet, devs[0].id)[0]["status"] == "escalated"
        assert len(reanalyses(fleet, "g-quorum")) == 1 and aid != r["analysis_id"]
    finally:
        policy.gate = saved


def test_alerts_cli_lists_acknowledges_and_reanalyses_with_one_line_errors(fleet, devices):
    from typer.testing import CliRunner

    from fleet_server.cli import app

    run, url = CliRunner(env={"TOCO_FLEET_TOKEN": fleet.token}), ["--server", fleet.http.url]
    bid = fleet.analysis["bundle_id"]
    (box,) = deployed_group(fleet, devices, "g-cli", 1)
    window(box, 1, bid, agreement=0.995, alert=True)
    assert wait_until(lambda: bool(alerts(fleet, box.id)))
    alert_id = alerts(fleet, box.id)[0]["alert_id"]
    out = run.invoke(app, ["alerts", "list", "--device", box.id, *url], terminal_width=200)
    assert out.exit_code == 0 and alert_id in out.output and "data" in out.output and "open" in out.output
    out = run.invoke(app, ["alerts", "ack", alert_id, *url])
    assert out.exit_code == 0 and "acknowledged" in out.output
    window(box, 2, bid, agreement=0.995, alert=True)  # the box keeps alerting on what the operator saw
    assert wait_until(lambda: len(alerts(fleet, box.id)[0]["evidence"]["windows"]) == 2)
    assert [a["status"] for a in alerts(fleet, box.id)] == ["acknowledged"]
    out = run.invoke(app, ["alerts", "reanalyse", alert_id, *url])
    assert out.exit_code == 2 and "409" in out.output and "acknowledged already" in out.output
    assert len(out.output.strip().splitlines()) == 1
    out = run.invoke(app, ["alerts", "accept", "a-nope", *url])
    assert out.exit_code == 2 and "404" in out.output and "a-nope" in out.output


def test_an_unshadowed_box_is_classified_by_scoring_its_samples_against_the_base(fleet, devices, lenet):
    from toco_core.messages import DisputedRef
    from toco_core.runtime import make_session

    policy, bid = fleet.server.policy, fleet.analysis["bundle_id"]
    saved = policy.mode, policy.gate
    policy.mode = "approval"
    policy.gate = dataclasses.replace(policy.gate, min_interval_s=0, daily_cap=100)
    x = lenet["x"][:10]
    base = make_session(lenet["onnx"]).run(None, {"image": x})[0].argmax(1)
    try:
        agreeing, flipping = deployed_group(fleet, devices, "g-score", 2)
        for dev, classes in ((agreeing, base), (flipping, (base + 1) % 10)):  # what the box's model said
            refs = [DisputedRef(ref=f"{dev.id}-7-{i}", reason="low_confidence", confidence=0.4, model_class=int(c))
                    for i, c in enumerate(classes)]
            dev.send(DriftMessage(device_id=dev.id, bundle_id=bid, window_index=7, opened_at=time.time() - 5,
                                  closed_at=time.time(), n_samples=256, n_shadowed=0, mean_confidence=0.6,
                                  mean_entropy=0.9, input_mean=0.1, input_std=0.3, out_of_band=["input_shift"],
                                  consecutive_out_of_band=3, alert=True, disputed=refs))
            assert wait_until(lambda dev=dev: bool(alerts(fleet, dev.id)))
            assert alerts(fleet, dev.id)[0]["status"] == "classifying"
            dev.samples(x, window=7)  # answering the upload-samples command
        assert wait_until(lambda: alerts(fleet, agreeing.id)[0]["status"] != "classifying", timeout=15)
        assert wait_until(lambda: alerts(fleet, flipping.id)[0]["status"] != "classifying", timeout=15)
        ok, bad = alerts(fleet, agreeing.id)[0], alerts(fleet, flipping.id)[0]
        assert ok["kind"] == "data" and ok["status"] == "open"
        assert "10 samples: agreement with the base 100%" in ok["why"]
        assert bad["kind"] == "fidelity" and bad["status"] == "reanalysing"
        assert "agreement with the base 0%" in bad["why"]
        assert [r["trigger_devices"] for r in reanalyses(fleet, "g-score")] == [[flipping.id]]
    finally:
        policy.mode, policy.gate = saved
