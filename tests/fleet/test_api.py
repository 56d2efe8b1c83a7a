"""Every HTTP endpoint, with good and bad input, against a running server (both broker kinds)."""

from __future__ import annotations

import json
import time

from tests.fleet.conftest import PLAN, device_json, succeed, wait_until
from toco_core.bundle import load_public_key, unpack_bundle, verify_bundle_bytes, verify_manifest
from toco_core.messages import BundleManifest, PlanSummary
from toco_core.parts_bundle import source_from_parts, verify_parts


def test_health_and_public_key(fleet):
    h = fleet.api.get("/api/health").json()
    assert h["status"] == "ok" and h["broker"] == "connected"
    assert fleet.api.get("/api/public-key").text.startswith("-----BEGIN PUBLIC KEY-----")
    assert fleet.api.get("/openapi.json").json()["info"]["title"] == "TOCO Fleet"


def test_analysis_produces_a_signed_bundle(fleet):
    a = fleet.analysis
    assert a["status"] == "done", a["error"]
    assert a["progress"]["phase"] == "done" and a["bundle_id"]
    assert a["manifest"]["samples_used"] > 0 and {"prune", "quantize", "prune+quantize"} <= set(a["curves"])
    assert any(x["analysis_id"] == a["analysis_id"] for x in fleet.api.get("/api/analyses").json())
    path = fleet.server.store.bundle_path(a["bundle_id"])
    data = path.read_bytes()
    manifest = BundleManifest.model_validate_json(path.with_suffix(".manifest.json").read_text())
    verify_manifest(manifest, load_public_key(fleet.api.get("/api/public-key").content))
    verify_bundle_bytes(data, manifest)
    parts = unpack_bundle(data)  # a parts bundle: every part listed in the signed manifest
    verify_parts(parts, manifest)
    assert {"head", "band/0", "calib/heldout", "base"} <= set(parts)
    source, result, info = source_from_parts(parts)
    assert info.model_name == "lenet5" and info.analysis_id == a["analysis_id"] and info.budget == 0.05
    assert info.format == 2 and source.is_base  # the optional fp32 part is in the server's bundle
    assert result.manifest.model_sha256 == info.model_sha256
    assert (fleet.server.settings.signing_key_path.stat().st_mode & 0o777) == 0o600


def test_models_endpoints_and_bad_uploads(fleet, lenet):
    models = fleet.api.get("/api/models").json()
    m = models[0]
    assert m["name"] == "lenet5" and m["pool_size"] == 120 and m["weights"] > 1000 and len(m["sha256"]) == 64
    assert fleet.api.get(f"/api/models/{m['model_id']}").json() == m
    r = fleet.api.get("/api/models/m-nope")
    assert r.status_code == 404 and "m-nope" in r.json()["detail"]
    r = fleet.api.post("/api/models", files={"file": ("m.onnx", b"not onnx"), "pool": ("p.npz", lenet["pool"])},
                       data={"name": "x"})
    assert r.status_code == 400 and r.json()["detail"]
    r = fleet.api.post("/api/models", files={"file": ("m.onnx", lenet["onnx"]), "pool": ("p.npz", b"garbage")},
                       data={"name": "x"})
    assert r.status_code == 400 and "pool" in r.json()["detail"]
    r = fleet.api.post("/api/models", files={"file": ("m.onnx", lenet["onnx"])}, data={"name": "x"})
    assert r.status_code == 422 and "pool" in r.json()["detail"]
    r = fleet.api.post("/api/models", files={"file": ("m.onnx", lenet["onnx"]), "pool": ("p.npz", lenet["pool"])},
                       data={"name": "x", "preprocessing": "{not json"})
    assert r.status_code == 400 and "preprocessing" in r.json()["detail"]


def test_analysis_bad_input(fleet):
    mid = fleet.analysis["model_id"]
    r = fleet.api.post(f"/api/models/{mid}/analyses", json={"budget": 2})
    assert r.status_code == 422 and "budget" in r.json()["detail"]
    r = fleet.api.post(f"/api/models/{mid}/analyses", json={"task": "ranking"})
    assert r.status_code == 422 and "task" in r.json()["detail"]
    r = fleet.api.post(f"/api/models/{mid}/analyses", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("invalid request")
    r = fleet.api.post("/api/models/m-nope/analyses", json={})
    assert r.status_code == 404 and "m-nope" in r.json()["detail"]
    r = fleet.api.get("/api/analyses/a-nope")
    assert r.status_code == 404 and "a-nope" in r.json()["detail"]
    # the scored output is passed through to the analysis, which names a wrong one in its error
    a = fleet.api.post(f"/api/models/{mid}/analyses", json={"output": "no-such-tensor"}).json()
    assert wait_until(lambda: fleet.api.get(f"/api/analyses/{a['analysis_id']}").json()["status"] in ("done", "failed"),
                      timeout=120, step=0.5)
    done = fleet.api.get(f"/api/analyses/{a['analysis_id']}").json()
    assert done["status"] == "failed" and "'no-such-tensor' is no tensor" in done["error"], done["error"]


def test_whatif(fleet):
    aid = fleet.analysis["analysis_id"]
    ok = fleet.api.post(f"/api/analyses/{aid}/whatif", json={"budget": 0.05, "memory": 64 << 20}).json()
    assert ok["feasible"] and ok["plan"]["predicted_disagreement"] <= 0.05 and ok["plan"]["label"]
    small = fleet.api.post(f"/api/analyses/{aid}/whatif", json={"budget": 0.05, "objective": "size"}).json()
    assert small["plan"]["predicted_storage_bytes"] <= ok["plan"]["predicted_storage_bytes"]
    # a PlanSummary of predictions: nothing was built, so no measured figure is claimed
    plan = PlanSummary.model_validate(ok["plan"])
    model = next(m for m in fleet.api.get("/api/models").json() if m["model_id"] == fleet.analysis["model_id"])
    assert plan.base_file_bytes == model["size_bytes"] and plan.predicted_memory_bytes > 0
    assert plan.storage_bytes is None and plan.measured_disagreement is None
    no = fleet.api.post(f"/api/analyses/{aid}/whatif", json={"budget": 0.05, "storage": 100}).json()
    assert not no["feasible"] and no["plan"] is None and "budget" in no["reason"]
    r = fleet.api.post(f"/api/analyses/{aid}/whatif", json={"budget": 0.05, "device_id": "ghost"})
    assert r.status_code == 404 and "ghost" in r.json()["detail"]
    r = fleet.api.post(f"/api/analyses/{aid}/whatif", json={"profile": {"total_memory": -1}})
    assert r.status_code == 400 and "profile" in r.json()["detail"]
    r = fleet.api.post(f"/api/analyses/{aid}/whatif", json={"budget": 0.05, "bogus": 1})
    assert r.status_code == 422 and "bogus" in r.json()["detail"]


def test_whatif_names_the_plan_the_box_then_builds(fleet):
    """The what-if for a box's profile is the plan that box's recompression tries first: the same
    runtime forms (this box runs int8) and the same tie floor (the curves' sample count). The box
    may still step down to another runtime at that point: only it can measure int8's speed."""
    from fleet_server.registry import analysis_paths
    from toco_core.analysis_result import load_result
    from toco_core.errors import SelfTestError
    from toco_core.onnx_model import compressible_weights, load_model, model_bytes
    from toco_core.plan import CompressionPlan, Policy
    from toco_core.plan_build import build
    from toco_core.probe import probe_device
    from toco_core.recompress import recompress
    from toco_core.solver import plans_for_device
    from toco_core.units import format_size

    aid = fleet.analysis["analysis_id"]
    paths = analysis_paths(fleet.server.db, analysis_id=aid)
    here = probe_device(paths["result_dir"], benchmark=False, device_id="wi-here")
    for objective in ("fidelity", "size"):
        told = fleet.api.post(f"/api/analyses/{aid}/whatif", json={"budget": 0.05, "objective": objective,
                                                                   "profile": here.model_dump(mode="json")}).json()
        tried: list[CompressionPlan] = []
        try:
            recompress(load_model(paths["model_path"]), load_result(paths["result_dir"]), here,
                       Policy(budget=0.05, objective=objective), measure_memory=False, before_build=tried.append)
        except SelfTestError as exc:  # on a busy shared machine every candidate can measure slower than the base
            assert "slower than the base" in str(exc), exc
        first, plan = tried[0], told["plan"]
        assert (first.prune_scale, first.quant_scale, first.runtime) == (
            plan["prune_scale"], plan["quant_scale"], plan["runtime"]), objective
        assert first.label == plan["label"], objective
    # the analysis built every point's storage form: the what-if's sizes are the bytes the box will store,
    # so a limit at the smallest plan's form gets it and a byte less gets "infeasible" with that size
    model, result = load_model(paths["model_path"]), load_result(paths["result_dir"])
    smallest = plans_for_device(result, compressible_weights(model), len(model_bytes(model)), here,
                                Policy(budget=0.05, objective="size"))[0]
    coded = len(build(model, result, smallest).storage)
    assert coded == smallest.predicted_storage
    for limit, feasible in ((coded, True), (coded - 1, False)):
        told = fleet.api.post(f"/api/analyses/{aid}/whatif", json={"budget": 0.05, "objective": "size",
                                                                   "storage": limit,
                                                                   "profile": here.model_dump(mode="json")}).json()
        assert told["feasible"] is feasible, told
        if feasible:
            assert told["plan"]["predicted_storage_bytes"] == coded, told
        else:
            assert f"needs storage {format_size(coded)} vs" in told["reason"], told


def test_whatif_for_a_known_device(fleet, devices):
    devices(f"wi-{fleet.kind}")
    assert wait_until(lambda: device_json(fleet, f"wi-{fleet.kind}").get("online"))
    r = fleet.api.post(f"/api/analyses/{fleet.analysis['analysis_id']}/whatif",
                       json={"budget": 0.05, "device_id": f"wi-{fleet.kind}"}).json()
    assert r["feasible"] and r["limits"]["memory"] == 300 << 20


def test_deploying_to_a_box_whose_caps_leave_no_plan_warns_first(fleet, devices):
    roomy, tiny = f"roomy-{fleet.kind}", f"tiny-{fleet.kind}"
    group = f"g-warn-{fleet.kind}"
    devices(roomy, group=group, responder=succeed)
    devices(tiny, group=group, responder=succeed, hardware={"storage_budget": 2000})  # 2 KB for a 250 KB model
    assert wait_until(lambda: all(device_json(fleet, d).get("online") for d in (roomy, tiny)))
    dep = fleet.api.post("/api/deployments", json={"analysis_id": fleet.analysis["analysis_id"],
                                                   "target": {"group": group}}).json()
    assert [w["device_id"] for w in dep["expected_infeasible"]] == [tiny]
    assert "storage" in dep["expected_infeasible"][0]["reason"]
    # a warning, not a refusal: both boxes get the bundle and give their own verdict
    assert {d["device_id"] for d in dep["devices"]} == {roomy, tiny}


def test_devices_deployments_drift_endpoints(fleet, devices):
    did = f"api-{fleet.kind}"
    dev = devices(did, group=f"g-api-{fleet.kind}", responder=succeed)
    assert wait_until(lambda: device_json(fleet, did).get("online"))
    listed = {d["device_id"]: d for d in fleet.api.get("/api/devices").json()}
    assert listed[did]["hardware"]["total_memory"] == 512 << 20 and listed[did]["group"] == f"g-api-{fleet.kind}"
    assert listed[did]["state"] == "online" and listed[did]["active"] is None
    r = fleet.api.get("/api/devices/ghost")
    assert r.status_code == 404 and "ghost" in r.json()["detail"]
    aid, bid = fleet.analysis["analysis_id"], fleet.analysis["bundle_id"]
    dep = fleet.api.post("/api/deployments", json={"analysis_id": aid, "target": {"device": did}}).json()
    assert dep["target"] == {"device": did} and dep["bundle_id"] == bid
    assert wait_until(lambda: fleet.api.get(f"/api/deployments/{dep['deployment_id']}").json()["stage"] == "done"), (
        dev.commands, fleet.api.get(f"/api/deployments/{dep['deployment_id']}").json())
    detail = device_json(fleet, did)
    assert detail["active"]["bundle_id"] == bid and detail["active"]["plan_label"] == "prune 50% / fp32"
    # the view reads the typed plan: the built size, the base file, agreements from the plan's disagreements
    assert {k: detail["active"][k] for k in ("model_name", "storage_bytes", "base_file_bytes")} == \
        {"model_name": "lenet5", "storage_bytes": 60_000, "base_file_bytes": 248_433}
    assert detail["active"]["measured_agreement"] == 1 - PLAN.measured_disagreement
    assert PlanSummary.model_validate(detail["active"]["plan"]) == PLAN
    assert [h["phase"] for h in detail["deployments"]][:1] == ["active"]
    dev.drift(0, bid, alert=False)
    assert wait_until(lambda: len(fleet.api.get(f"/api/drift?device_id={did}").json()) == 1)
    point = fleet.api.get(f"/api/drift?device_id={did}").json()[0]
    assert point["agreement"] == 0.99 and point["bands"]["input_shift"] == [0.0, 0.3] and not point["alert"]
    assert device_json(fleet, did)["last_drift"]["window"] == 0
    assert any(d["deployment_id"] == dep["deployment_id"] for d in fleet.api.get("/api/deployments").json())
    rb = fleet.api.post(f"/api/deployments/{dep['deployment_id']}/rollback").json()
    assert rb["stage"] == "rolled_back"
    assert wait_until(lambda: any(getattr(c, "command", None) == "rollback" for c in dev.commands)), dev.commands
    assert fleet.api.post(f"/api/deployments/{dep['deployment_id']}/rollback").status_code == 409
    for path in ("/api/deployments/d-nope", "/api/drift?device_id=ghost"):
        r = fleet.api.get(path)
        assert r.status_code == 404 and "nope" in r.json()["detail"] or "ghost" in r.json()["detail"]
    assert fleet.api.post("/api/deployments/d-nope/rollback").status_code == 404


def test_deployment_bad_input(fleet):
    aid = fleet.analysis["analysis_id"]
    cases = [({"analysis_id": aid, "target": {"device": "a", "group": "b"}}, 422, "exactly one"),
             ({"analysis_id": aid, "target": {}}, 422, "exactly one"),
             ({"analysis_id": aid, "target": {"device": "ghost"}}, 404, "ghost"),
             ({"analysis_id": aid, "target": {"group": "nobody"}}, 404, "nobody"),
             ({"analysis_id": "a-nope", "target": {"all": True}}, 404, "a-nope"),
             ({"analysis_id": aid, "target": {"all": True}, "canary_share": 0}, 422, "canary_share")]
    for body, code, word in cases:
        r = fleet.api.post("/api/deployments", json=body)
        assert r.status_code == code and word in r.json()["detail"], (body, r.text)


def test_reanalyses_endpoints(fleet):
    assert isinstance(fleet.api.get("/api/reanalyses").json(), list)
    r = fleet.api.post("/api/reanalyses/r-nope/approve")
    assert r.status_code == 404 and "r-nope" in r.json()["detail"]


def test_events_stream(fleet, devices):
    import threading

    import httpx

    got: list[str] = []

    def listen():
        with httpx.stream("GET", f"{fleet.http.url}/api/events", timeout=10, headers=fleet.auth) as r:
            for line in r.iter_lines():
                got.append(line)
                if line.startswith("data:") and f"ev-{fleet.kind}" in line:
                    return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    time.sleep(0.5)
    devices(f"ev-{fleet.kind}")
    t.join(10)
    assert "event: device" in got
    data = json.loads([x for x in got if x.startswith("data:")][-1][5:])
    assert data["device_id"] == f"ev-{fleet.kind}" and data["online"]
