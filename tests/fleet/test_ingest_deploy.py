"""Ingest of malformed payloads, staged rollouts stopping at the threshold, silent devices timing out."""

from __future__ import annotations

import time

from tests.fleet.conftest import device_json, fail, succeed, wait_until
from toco_core.messages import StateMessage, TelemetryMessage, encode

BAD = [b"not json", b"{}", b'{"schema_version": 99}', b"\xff\xfe", b"[1,2]"]


def test_malformed_payloads_are_counted_and_dropped(fleet, devices):
    did = f"bad-{fleet.kind}"
    dev = devices(did)
    assert wait_until(lambda: device_json(fleet, did).get("online"))
    before = fleet.api.get("/api/health").json()["messages"]
    kinds = ["state", "telemetry", "status", "drift", "samples"]
    for kind in kinds:
        for payload in BAD:
            dev.raw(kind, payload)
    # a payload that names another device on this device's topic is refused too
    dev.raw("telemetry", encode(TelemetryMessage(device_id="someone-else", mem_available=1, disk_free=1, cpu_load=0.1)))
    dev.send(TelemetryMessage(device_id=did, mem_available=123, disk_free=1, cpu_load=0.5, inferences=7))
    assert wait_until(lambda: len(device_json(fleet, did).get("telemetry", [])) == 1)
    after = fleet.api.get("/api/health").json()
    assert after["status"] == "ok" and after["broker"] == "connected"
    for kind in kinds:
        extra = 1 if kind == "telemetry" else 0
        assert after["messages"].get(f"dropped.{kind}", 0) - before.get(f"dropped.{kind}", 0) == len(BAD) + extra, kind
    t = device_json(fleet, did)["telemetry"][0]
    assert t["cpu_percent"] == 50.0 and t["available_memory"] == 123 and t["inferences"] == 7


def test_staged_rollout_stops_at_the_failure_threshold(fleet, devices):
    group = f"g-fail-{fleet.kind}"
    for i in range(10):
        devices(f"f{i}-{fleet.kind}", group=group, responder=fail)
    assert wait_until(lambda: sum(d["group"] == group and d["online"]
                                  for d in fleet.api.get("/api/devices").json()) == 10)
    dep = fleet.api.post("/api/deployments", json={"analysis_id": fleet.analysis["analysis_id"],
                                                   "target": {"group": group},
                                                   "canary_share": 0.2, "failure_threshold": 0.2}).json()
    assert dep["counts"]["pending"] == 8 and dep["counts"]["in_progress"] + dep["counts"]["failed"] == 2
    url = f"/api/deployments/{dep['deployment_id']}"
    assert wait_until(lambda: fleet.api.get(url).json()["stage"] == "stopped")
    final = fleet.api.get(url).json()
    assert final["counts"] == {"pending": 8, "in_progress": 0, "succeeded": 0, "failed": 2}
    assert "threshold" in final["reason"]
    failed = [d for d in final["devices"] if d["outcome"] == "failed"]
    assert all(d["reason"].startswith("self_test_failed") for d in failed)
    time.sleep(0.5)
    assert fleet.api.get(url).json()["counts"]["pending"] == 8  # the rest never got the command
    assert device_json(fleet, failed[0]["device_id"])["state"] == "failed"


def test_staged_rollout_goes_canary_then_rest(fleet, devices):
    group = f"g-ok-{fleet.kind}"
    devs = [devices(f"s{i}-{fleet.kind}", group=group, responder=succeed) for i in range(5)]
    assert wait_until(lambda: sum(d["group"] == group and d["online"]
                                  for d in fleet.api.get("/api/devices").json()) == 5)
    dep = fleet.api.post("/api/deployments", json={"analysis_id": fleet.analysis["analysis_id"],
                                                   "target": {"group": group}, "canary_share": 0.2}).json()
    url = f"/api/deployments/{dep['deployment_id']}"
    assert wait_until(lambda: fleet.api.get(url).json()["stage"] == "done")
    final = fleet.api.get(url).json()
    assert final["counts"]["succeeded"] == 5
    assert sorted(d["wave"] for d in final["devices"]) == ["canary"] + ["rest"] * 4
    assert all(len(d.commands) == 1 for d in devs), [d.commands for d in devs]


def test_silent_device_times_out_to_failed(fleet, devices):
    did = f"mute-{fleet.kind}"
    dev = devices(did)  # never answers
    assert wait_until(lambda: device_json(fleet, did).get("online"))
    old = fleet.server.deployments.timeout_s
    fleet.server.deployments.timeout_s = 1.0
    try:
        dep = fleet.api.post("/api/deployments", json={"analysis_id": fleet.analysis["analysis_id"],
                                                       "target": {"device": did}}).json()
        assert device_json(fleet, did)["state"] == "deploying"
        url = f"/api/deployments/{dep['deployment_id']}"
        assert wait_until(lambda: fleet.api.get(url).json()["stage"] in ("stopped", "done"), timeout=10)
    finally:
        fleet.server.deployments.timeout_s = old
    final = fleet.api.get(url).json()
    assert final["counts"]["failed"] == 1 and final["devices"][0]["reason"].startswith("timeout")
    assert len(dev.commands) == 1
    assert device_json(fleet, did)["state"] == "failed"


def test_stale_will_does_not_take_a_newer_birth_offline(fleet, devices):
    did = f"birth-{fleet.kind}"
    dev = devices(did)
    dev.send(StateMessage(device_id=did, state="online", birth=5))
    assert wait_until(lambda: device_json(fleet, did).get("birth") == 5)
    dev.send(StateMessage(device_id=did, state="offline", birth=4))
    dev.send(TelemetryMessage(device_id=did, mem_available=1, disk_free=1, cpu_load=0))
    assert wait_until(lambda: len(device_json(fleet, did).get("telemetry", [])) == 1)
    assert device_json(fleet, did)["online"]
