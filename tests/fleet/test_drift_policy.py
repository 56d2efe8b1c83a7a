"""A drift alert from simulated devices queues a re-analysis with their field samples (approval mode),
which after approval analyses model pool + field samples, builds a new bundle and redeploys the group."""

from __future__ import annotations

import pytest

from fleet_server.drift_policy import trigger_reason
from tests.fleet.conftest import device_json, succeed, wait_until
from toco_core.messages import DisputedRef, DriftMessage, RebaseDriftCommand, UploadSamplesCommand


def _window(agreement: float, shadowed: int, alert: bool = False) -> DriftMessage:
    return DriftMessage(device_id="cam", window_index=1, opened_at=0.0, closed_at=60.0, n_samples=shadowed,
                        n_shadowed=shadowed, measured_agreement=agreement, mean_confidence=0.9, mean_entropy=0.2,
                        input_mean=0.1, input_std=0.3, alert=alert)


@pytest.mark.parametrize(("agreement", "shadowed", "triggers"), [
    (29 / 31, 31, False),   # two flips in 31: a 99.4% model does that now and then
    (0.90, 400, True),      # 40 flips in 400 is drift
    (15 / 31, 31, True),    # half the inputs flip: drift even on a small window
    (0.50, 10, False),      # too few shadowed inputs to judge
])
def test_agreement_triggers_only_when_it_is_below_the_floor_beyond_sampling_noise(agreement, shadowed, triggers):
    why = trigger_reason(_window(agreement, shadowed), budget=0.01, margin=0.05)
    assert (why is not None) == triggers, why
    if triggers:
        assert f"{shadowed} inputs" in why and "94.0%" in why


def test_a_held_alert_triggers_whatever_the_agreement():
    assert "alert" in trigger_reason(_window(1.0, 31, alert=True), budget=0.01, margin=0.05)


@pytest.mark.parametrize("fleet", ["mosquitto"], indirect=True)
def test_drift_alert_reanalysis_waits_for_approval_then_redeploys(fleet, devices, lenet):
    fleet.server.policy.mode = "approval"
    group, aid, bid = "g-drift", fleet.analysis["analysis_id"], fleet.analysis["bundle_id"]

    def mine() -> list[dict]:  # the fleet is shared by the session's tests: this group's re-analyses
        return [r for r in fleet.api.get("/api/reanalyses").json() if r["group"] == group]

    devs = [devices(f"drift{i}", group=group, responder=succeed) for i in range(2)]
    assert wait_until(lambda: sum(d["group"] == group and d["online"]
                                  for d in fleet.api.get("/api/devices").json()) == 2)
    dep = fleet.api.post("/api/deployments", json={"analysis_id": aid, "target": {"group": group}}).json()
    assert wait_until(lambda: fleet.api.get(f"/api/deployments/{dep['deployment_id']}").json()["stage"] == "done")
    calm, shifted = devs
    calm.drift(0, bid, alert=False)
    refs = [DisputedRef(ref=f"drift1-1-{i}", reason="disagreement", confidence=0.4, model_class=1, base_class=7)
            for i in range(6)]
    shifted.drift(1, bid, alert=True, agreement=0.7, disputed=refs)
    assert wait_until(lambda: any(r["status"] == "pending_approval" for r in mine()))
    r = next(r for r in mine() if r["status"] == "pending_approval")
    assert r["trigger_devices"] == ["drift1"] and "drift alert" in r["why"] and r["analysis_id"] is None
    assert device_json(fleet, "drift1")["state"] == "alert"
    # the shifted device is asked for its disputed inputs and sends them (rotated digits)
    assert wait_until(lambda: any(isinstance(c, UploadSamplesCommand) for c in shifted.commands))
    cmd = next(c for c in shifted.commands if isinstance(c, UploadSamplesCommand))
    assert cmd.window == 1 and cmd.refs == [x.ref for x in refs]
    shifted.samples(lenet["x"][:6, :, ::-1, :], window=1)
    shifted.drift(2, bid, alert=True, agreement=0.6)  # the alert holds: no second re-analysis for this bundle
    assert wait_until(lambda: fleet.server.ingest.stats["samples"] >= 6)
    assert len(mine()) == 1
    assert mine()[0]["status"] == "pending_approval"  # waits for a person
    approved = fleet.api.post(f"/api/reanalyses/{r['reanalysis_id']}/approve").json()
    assert approved["status"] == "queued"
    assert fleet.api.post(f"/api/reanalyses/{r['reanalysis_id']}/approve").status_code == 409
    assert wait_until(lambda: mine()[0]["analysis_id"] is not None, timeout=10)
    new_aid = mine()[0]["analysis_id"]
    a = fleet.api.get(f"/api/analyses/{new_aid}").json()
    assert a["reason"] == "drift: drift1" and a["field_samples"] == 6
    # the analysed pool's 5%, held on the 6 field samples, but never below what its held-out samples resolve
    # (fleet_server.field_budget: between the scaled budget and the operator's)
    assert 0.05 * 6 / 126 - 1e-12 <= a["budget"] < 0.05
    # its bundle goes to the trigger device first (canary): one device of two is no quorum for the group
    assert wait_until(lambda: mine()[0]["status"] in ("canary", "failed"), timeout=150,
                      step=0.5)
    final = mine()[0]
    assert final["status"] == "canary", fleet.api.get(f"/api/analyses/{new_aid}").json()["error"]
    assert final["quorum"] == {"votes": 1, "online": 2, "needed": 2}
    a = fleet.api.get(f"/api/analyses/{new_aid}").json()
    assert a["bundle_id"] != bid and a["manifest"]["pool_size"] == 120 + 6
    canary = fleet.api.get(f"/api/deployments/{final['deployment_id']}").json()
    assert canary["target"] == {"devices": ["drift1"]} and canary["bundle_id"] == a["bundle_id"]
    assert wait_until(lambda: fleet.api.get(f"/api/deployments/{final['deployment_id']}").json()["stage"] == "done")
    assert device_json(fleet, "drift1")["active"]["bundle_id"] == a["bundle_id"]
    assert device_json(fleet, "drift0")["active"]["bundle_id"] == bid
    # the canary device activated the bundle built for its inputs: its reference is rebased on them
    assert wait_until(lambda: any(isinstance(c, RebaseDriftCommand) and c.reason == "converged"
                                  for c in shifted.commands))
    # an operator approves the group redeploy without a quorum
    fleet.api.post(f"/api/reanalyses/{r['reanalysis_id']}/approve").raise_for_status()
    assert wait_until(lambda: mine()[0]["status"] == "deployed")
    final = mine()[0]
    redeploy = fleet.api.get(f"/api/deployments/{final['group_deployment_id']}").json()
    assert redeploy["target"] == {"group": group} and redeploy["bundle_id"] == a["bundle_id"]
    assert wait_until(lambda: fleet.api.get(f"/api/deployments/{final['group_deployment_id']}").json()["stage"]
                      == "done")
    assert device_json(fleet, "drift0")["active"]["bundle_id"] == a["bundle_id"]
    assert not device_json(fleet, "drift1")["alert"]
    fleet.server.policy.mode = "auto"
