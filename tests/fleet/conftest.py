"""A real fleet server (embedded amqtt or a real mosquitto), the demo LeNet analysed once per
broker, and SimDevice: a small paho client speaking toco_core.messages (not a full agent)."""

from __future__ import annotations

import io
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from fleet_server.api import create_app
from fleet_server.auth import create_token
from fleet_server.config import FleetSettings
from fleet_server.enrollment import enroll
from fleet_server.server import FleetServer, HttpThread
from tests.fleet.postgres import PostgresCluster, PostgresUnavailable, postgres_cluster
from tests.support.broker import MOSQUITTO, Broker
from tests.support.processes import free_port
from tests.support.waiting import wait_until
from toco_core.analysis.settings import AnalysisSettings
from toco_core.messages import (
    DeployCommand,
    DriftCheck,
    DriftMessage,
    HardwareInfo,
    MessageKind,
    PlanSummary,
    RollbackCommand,
    Sample,
    SamplesMessage,
    StateMessage,
    StatusMessage,
    TelemetryMessage,
    encode,
    parse_message,
)
from toco_core.topics import DELIVERY, Topics, parse_broker_url

FAST = AnalysisSettings(initial_samples=16, samples_per_round=16, max_rounds=1, max_heldout=60, prune_rounds=1,
                        prune_round_samples=16, committee_members=2)
# HardwareInfo fields (what an agent's probe reports) of a small simulated box
HARDWARE = {"total_memory": 512 << 20, "available_memory": 300 << 20, "free_storage": 1 << 30, "physical_cores": 1,
            "logical_cores": 1, "cpu_model": "sim", "ort_version": "1.0", "formats": ["fp32"]}
# what an agent reports after deploying the LeNet: the plan's predictions and the built model's figures
PLAN = PlanSummary(label="prune 50% / fp32", model_name="lenet5", runtime="fp32", prune_scale=0.5, quant_scale=0.0,
                   predicted_disagreement=0.01, predicted_storage_bytes=61_000, base_file_bytes=248_433,
                   storage_bytes=60_000, runnable_bytes=124_000, measured_disagreement=0.015,
                   layer_formats={"fp32": 5})
__all__ = ["wait_until", "free_port"]


@pytest.fixture(scope="session")
def lenet() -> dict:
    """ONNX bytes of the trained demo LeNet-5 and an .npz pool of 120 MNIST digits (x, y)."""
    from toco_core.demo.data import mnist_splits
    from toco_core.demo.train import demo_model

    d = mnist_splits()
    buf = io.BytesIO()
    np.savez(buf, x=d.x_pool[:120], y=d.y_pool[:120])
    return {"onnx": Path(demo_model("lenet5")).read_bytes(), "pool": buf.getvalue(), "x": d.x_heldout[:64]}


class Fleet:
    """A started server + HTTP API + broker URL."""

    kind: str  # the fixtures' broker ("embedded", "mosquitto")
    analysis: dict  # the fixtures' finished analysis

    def __init__(self, tmp: Path, broker: str, **overrides) -> None:
        kw: dict[str, Any] = dict(data_dir=tmp, broker=broker, broker_port=free_port(), http_port=0, fleet="test",
                  analysis=FAST, tick_s=0.2, samples_wait_s=2.0, deploy_timeout_s=30)
        kw.update(overrides)
        self.server = FleetServer(FleetSettings(**kw)).start()
        self.http = HttpThread(create_app(self.server), "127.0.0.1", 0).start()
        self.token, _ = create_token(self.server.db, role="admin", name="tests")
        self.auth = {"Authorization": f"Bearer {self.token}"}
        self.api = httpx.Client(base_url=self.http.url, timeout=30, headers=self.auth)
        self.port = parse_broker_url(self.server.broker_url).port
        self.topics = Topics("test")

    def analyse(self, lenet: dict) -> dict:
        """Register the LeNet and wait for its analysis; returns the finished Analysis."""
        return self.add_and_analyse(lenet)[1]

    def add_and_analyse(self, lenet: dict) -> tuple[dict, dict]:
        """Register the LeNet under the name lenet5 (a new version when it exists) and wait for its
        analysis; returns (the Model, the finished Analysis)."""
        m = self.api.post("/api/models", files={"file": ("m.onnx", lenet["onnx"]), "pool": ("p.npz", lenet["pool"])},
                          data={"name": "lenet5"})
        m.raise_for_status()
        a = self.api.post(f"/api/models/{m.json()['model_id']}/analyses", json={"budget": 0.05}).json()
        assert wait_until(lambda: self.api.get(f"/api/analyses/{a['analysis_id']}").json()["status"]
                          in ("done", "failed"),
                          timeout=300, step=0.5)  # about 30 s on a quiet 2-core box; a loaded one took > 120
        return m.json(), self.api.get(f"/api/analyses/{a['analysis_id']}").json()

    def stop(self) -> None:
        self.api.close()
        self.http.stop()
        self.server.stop()


@pytest.fixture(scope="session", params=["embedded", "mosquitto"])
def fleet(request, lenet, tmp_path_factory) -> Iterator[Fleet]:
    """A running server per broker kind, with the LeNet registered and analysed (``fleet.analysis``).

    On SQLite in its data dir; on a database of the session's PostgreSQL cluster with TOCO_FLEET_TEST_DB=postgres.
    """
    mosq = None
    if request.param == "mosquitto":
        mosq = Broker()
        mosq.start()
    db = {}
    if os.environ.get("TOCO_FLEET_TEST_DB") == "postgres":  # the whole suite on PostgreSQL (deploy/README.md)
        db = {"db_url": request.getfixturevalue("postgres").create_database(f"fleet_{request.param}")}
    f = Fleet(tmp_path_factory.mktemp(f"fleet-{request.param}"), mosq.url if mosq else "embedded", **db)
    f.kind = request.param
    f.analysis = f.analyse(lenet)
    yield f
    f.stop()
    if mosq is not None:
        mosq.cleanup()


class SimDevice:
    """A protocol-speaking device: birth, telemetry, drift, samples; answers deploy commands via ``responder``."""

    def __init__(self, port: int, fleet: str, device_id: str, group: str = "default",
                 responder: Callable[[SimDevice, DeployCommand], None] | None = None,
                 hardware: dict | None = None) -> None:
        """Connect and send the birth message; ``hardware`` overrides fields of HARDWARE (its caps, say)."""
        self.id, self.topics, self.seq = device_id, Topics(fleet), 0
        self.commands: list = []
        self.misrouted: list[str] = []
        self.responder = responder
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        offline = StateMessage(device_id=device_id, state="offline", birth=1)
        self.c.will_set(self.topics.device(MessageKind.STATE, device_id), encode(offline), qos=1, retain=True)

        def on_connect(c, u, f, rc, p):
            c.subscribe(self.topics.device(MessageKind.CMD, device_id), 1)
            self.ready.set()

        self.c.on_connect = on_connect
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.ready.wait(5)
        time.sleep(0.05)
        self.group, self.hardware = group, hardware
        self.send(self.birth())

    def birth(self) -> StateMessage:
        """The online state message this device sends on connect (its claimed group, its hardware)."""
        return StateMessage(device_id=self.id, state="online", birth=1, agent_version="sim-1", group=self.group,
                            hardware=HardwareInfo(**{**HARDWARE, **(self.hardware or {})}, device_id=self.id))

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic != self.topics.device(MessageKind.CMD, self.id):
            # amqtt 0.12 hands a new subscriber retained messages of other topics; mosquitto does not
            self.misrouted.append(msg.topic)
            return
        try:
            cmd = parse_message(MessageKind.CMD, msg.payload)
        except Exception:  # recorded, so a test can see the server sent garbage
            self.commands.append(("bad", msg.topic, msg.payload[:80]))
            return
        with self.lock:
            self.commands.append(cmd)
        if isinstance(cmd, DeployCommand) and self.responder is not None:
            threading.Thread(target=self.responder, args=(self, cmd), daemon=True).start()

    def send(self, message) -> None:
        kinds: dict[type, MessageKind] = {
            StateMessage: MessageKind.STATE, TelemetryMessage: MessageKind.TELEMETRY, StatusMessage: MessageKind.STATUS,
            DriftMessage: MessageKind.DRIFT, SamplesMessage: MessageKind.SAMPLES}
        kind = kinds[type(message)]
        message = message.model_copy(update={"seq": self.seq})
        self.seq += 1
        rule = DELIVERY[kind]
        self.c.publish(self.topics.device(kind, self.id), encode(message), qos=rule.qos, retain=rule.retain)

    def raw(self, kind: str, payload: bytes) -> None:
        self.c.publish(self.topics.device(kind, self.id), payload, qos=1).wait_for_publish(5)

    def status(self, cmd: DeployCommand | RollbackCommand, phase: str, **kw) -> None:
        self.send(StatusMessage(device_id=self.id, phase=phase, deployment_id=cmd.deployment_id,
                                bundle_id=cmd.bundle_id, **kw))

    def drift(self, window: int, bundle_id: str, alert: bool, agreement: float = 0.99, disputed=()) -> None:
        checks = [DriftCheck(name="agreement", value=agreement, reference=0.99, low=0.95, high=1.0, n=50,
                             in_band=not alert),
                  DriftCheck(name="input_shift", value=0.9 if alert else 0.05, reference=0.0, low=0.0, high=0.3, n=50,
                             in_band=not alert)]
        self.send(DriftMessage(device_id=self.id, bundle_id=bundle_id, window_index=window, opened_at=time.time() - 5,
                               closed_at=time.time(), n_samples=100, n_shadowed=50, predicted_agreement=0.99,
                               measured_agreement=agreement, mean_confidence=0.8, mean_entropy=0.4, input_mean=0.1,
                               input_std=0.3, checks=checks, out_of_band=["input_shift"] if alert else [],
                               consecutive_out_of_band=3 if alert else 0, alert=alert, disputed=list(disputed)))

    def samples(self, arrays: np.ndarray, window: int) -> None:
        import base64

        smp = [Sample(ref=f"{self.id}-{window}-{i}", dtype="float32", shape=list(a.shape),
                      data_b64=base64.b64encode(a.astype(np.float32).tobytes()).decode()) for i, a in enumerate(arrays)]
        self.send(SamplesMessage(device_id=self.id, window=window, samples=smp))

    def close(self) -> None:
        self.send(StateMessage(device_id=self.id, state="offline", birth=1))  # as the will would
        self.c.disconnect()
        self.c.loop_stop()


def succeed(dev: SimDevice, cmd: DeployCommand | RollbackCommand) -> None:
    """Responder: received -> downloading -> active (the download itself is the agent's job, tested elsewhere)."""
    for phase in ("received", "downloading", "self_test"):
        dev.status(cmd, phase)
    dev.status(cmd, "active", predicted_agreement=0.99, measured_agreement=0.985, plan=PLAN)


def fail(dev: SimDevice, cmd: DeployCommand) -> None:
    """Responder: the self-test fails."""
    dev.status(cmd, "received")
    dev.status(cmd, "failed", reason="self_test_failed", detail="measured 9% vs predicted 1%")


@pytest.fixture
def devices(fleet) -> Iterator[Callable[..., SimDevice]]:
    """Factory of SimDevices on the fleet's broker, enrolled in their group first (``enrolled=False``:
    a device the server has never heard of); all closed after the test."""
    made: list[SimDevice] = []

    def make(device_id: str, enrolled: bool = True, **kw) -> SimDevice:
        if enrolled:
            enroll(fleet.server.db, device_id, kw.get("group", "default"))
        d = SimDevice(fleet.port, "test", device_id, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def device_json(fleet: Fleet, device_id: str) -> dict:
    """GET /api/devices/{id} as JSON (404 -> {})."""
    r = fleet.api.get(f"/api/devices/{device_id}")
    return r.json() if r.status_code == 200 else {}


__all__ += ["PLAN", "Fleet", "SimDevice", "succeed", "fail", "device_json", "MOSQUITTO", "json"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throw-away PostgreSQL cluster for the session (tests/fleet/postgres.py). A missing
    PostgreSQL fails the tests, never skips them (`make system-deps` installs it)."""
    try:
        with postgres_cluster() as cluster:
            yield cluster
    except PostgresUnavailable as e:
        pytest.fail(f"{e} (run `make system-deps`)")


@pytest.fixture
def pg_url(postgres, request) -> str:
    """The SQLAlchemy URL of a new, empty database on the session's cluster, one per test."""
    return postgres.create_database(f"t{next(_PG_DATABASES)}")


_PG_DATABASES = itertools.count()
__all__ += ["PostgresCluster"]
