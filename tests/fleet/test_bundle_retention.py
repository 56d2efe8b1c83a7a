"""Stored bundles on a real server and mosquitto: one never announced is served from the store (as a
replica serves the others' bundles); retention deletes a superseded one (row, files, the retained
manifest on the broker, no longer served), keeps the bundle a device runs and the newest, and
deploying the analysis whose bundle went packs it again."""

from __future__ import annotations

import json
import threading

import paho.mqtt.client as mqtt

from fleet_server.enrollment import enroll
from tests.fleet.conftest import Fleet, SimDevice, device_json, succeed, wait_until
from tests.support.broker import Broker
from toco_core.bundle import BundleManifest
from toco_core.messages import DeployCommand, PartRange, PartRequest, encode


def retained(port: int, topic: str, wait_s: float = 1.5) -> bytes | None:
    """The retained payload on ``topic`` (None: nothing retained)."""
    got: list[bytes] = []
    ready = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)

    def on_connect(cl, u, f, rc, p) -> None:
        cl.subscribe(topic, 1)
        ready.set()

    def on_message(cl, u, m) -> None:
        got.append(bytes(m.payload))

    c.on_connect, c.on_message = on_connect, on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    ready.wait(5)
    wait_until(lambda: bool(got), timeout=wait_s, step=0.1)
    c.loop_stop()
    c.disconnect()
    return got[0] if got and got[0] else None


def head_range(fleet: Fleet, bundle_id: str, device_id: str, length: int = 4096) -> bytes | None:
    """The first ``length`` bytes of the bundle's head part as the server answers a PartRequest (None: no answer)."""
    got: list[bytes] = []
    ready = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)

    def on_connect(cl, u, f, rc, p) -> None:
        cl.subscribe(fleet.topics.part(bundle_id, device_id), 1)
        ready.set()

    def on_message(cl, u, m) -> None:
        got.append(bytes(m.payload))

    c.on_connect, c.on_message = on_connect, on_message
    c.connect("127.0.0.1", fleet.port)
    c.loop_start()
    try:
        ready.wait(5)
        ask = PartRequest(device_id=device_id, bundle_id=bundle_id,
                          ranges=[PartRange(part="head", offset=0, length=length)])
        c.publish(fleet.topics.get(bundle_id, device_id), encode(ask), qos=1).wait_for_publish(5)
        wait_until(lambda: bool(got), timeout=5)
    finally:
        c.loop_stop()
        c.disconnect()
    if not got:
        return None
    header, _, data = got[0].partition(b"\n")
    assert json.loads(header)["part"] == "head"
    return data


def test_superseded_bundles_go_and_a_deploy_packs_its_bundle_again(lenet, tmp_path):
    broker = Broker()
    broker.start()
    fleet = Fleet(tmp_path, broker.url, bundles_keep=1, bundle_min_age_days=0, retention_interval_s=86400)
    try:
        model, first = fleet.add_and_analyse(lenet)
        enroll(fleet.server.db, "keeper", "line")
        dev = SimDevice(fleet.port, "test", "keeper", group="line", responder=succeed)
        assert wait_until(lambda: device_json(fleet, "keeper").get("online"), timeout=10)
        fleet.api.post("/api/deployments", json={"analysis_id": first["analysis_id"], "target": {"device": "keeper"}},
                       ).raise_for_status()
        assert wait_until(lambda: (device_json(fleet, "keeper").get("active") or {}).get("bundle_id")
                          == first["bundle_id"], timeout=30)
        later = []
        for budget in (0.04, 0.03):  # two more analyses of the same model: two more bundles
            a = fleet.api.post(f"/api/models/{model['model_id']}/analyses", json={"budget": budget}).json()
            assert wait_until(lambda: fleet.api.get(f"/api/analyses/{a['analysis_id']}").json()["status"] == "done",
                              timeout=120, step=0.5)
            later.append(fleet.api.get(f"/api/analyses/{a['analysis_id']}").json())
        middle, newest = later
        assert len({first["bundle_id"], middle["bundle_id"], newest["bundle_id"]}) == 3
        store = fleet.server.store
        # replicas share part requests, so the one a request reaches may never have announced the bundle:
        # it serves a stored one all the same (here: the newest, never deployed)
        stored = store.bundle_path(newest["bundle_id"]).read_bytes()
        manifest_path = store.bundle_path(newest["bundle_id"]).with_suffix(".manifest.json")
        head = next(f for f in BundleManifest.model_validate(json.loads(manifest_path.read_text())).files
                    if f.name == "head")
        assert head_range(fleet, newest["bundle_id"], "reader-1", 100) == stored[head.offset:head.offset + 100]
        assert head_range(fleet, "0" * 64, "reader-1") is None  # nobody stored it

        # the middle bundle is neither the newest nor run by a device: it goes, the other two stay
        assert fleet.server.retention.run()["bundles"] == 1
        assert not store.bundle_path(middle["bundle_id"]).exists()
        assert store.bundle_path(first["bundle_id"]).exists() and store.bundle_path(newest["bundle_id"]).exists()
        assert fleet.api.get(f"/api/analyses/{middle['analysis_id']}").json()["bundle_id"] is None
        assert retained(fleet.port, fleet.topics.manifest(first["bundle_id"])) is not None  # announced by the deploy
        assert fleet.server.retention.run()["bundles"] == 0

        # deploying the analysis whose bundle went packs it again (the same bytes: the same id)
        dep = fleet.api.post("/api/deployments", json={"analysis_id": middle["analysis_id"],
                                                       "target": {"device": "keeper"}})
        assert dep.status_code == 200, dep.text
        assert store.bundle_path(middle["bundle_id"]).exists()
        assert fleet.api.get(f"/api/analyses/{middle['analysis_id']}").json()["bundle_id"] == middle["bundle_id"]
        assert wait_until(lambda: any(isinstance(c, DeployCommand) and c.bundle_id == middle["bundle_id"]
                                      for c in dev.commands), timeout=10)
        assert wait_until(lambda: (device_json(fleet, "keeper").get("active") or {}).get("bundle_id")
                          == middle["bundle_id"], timeout=30)
        # the first bundle is run by nobody now, and the re-packed one is the newest packed: the first
        # and the last analysis' bundles go, and the broker forgets the announced one's manifest
        assert fleet.server.retention.run()["bundles"] == 2
        assert not store.bundle_path(first["bundle_id"]).exists()
        assert not store.bundle_path(newest["bundle_id"]).exists()
        assert head_range(fleet, newest["bundle_id"], "reader-1") is None  # deleted: no longer served
        assert retained(fleet.port, fleet.topics.manifest(first["bundle_id"])) is None
        assert retained(fleet.port, fleet.topics.manifest(middle["bundle_id"])) is not None
    finally:
        fleet.stop()
        broker.cleanup()
