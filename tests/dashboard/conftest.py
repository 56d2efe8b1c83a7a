"""A real fleet server on a real mosquitto, simulated devices speaking the MQTT protocol, and
headless Debian chromium driven by Playwright (never `playwright install`).

The LeNet analysis (the analysis page needs one) is queued when the server starts and runs in
the server's worker process while the overview and device tests use the browser.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterator
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
from tests.support.broker import MOSQUITTO, Broker
from tests.support.waiting import wait_until
from toco_core.analysis.settings import AnalysisSettings
from toco_core.messages import (
    ActiveModel,
    DriftCheck,
    DriftMessage,
    HardwareInfo,
    MessageKind,
    PlanSummary,
    StateMessage,
    TelemetryMessage,
    encode,
)
from toco_core.topics import DELIVERY, Topics

ARTIFACTS = Path(__file__).parent / "artifacts"
FLEET = "dash"
# the smallest analysis that still has rounds, tolerances and curves to draw
FAST = AnalysisSettings(initial_samples=16, samples_per_round=16, max_rounds=1, max_heldout=40, prune_rounds=1,
                        prune_round_samples=16, committee_members=2, budget=0.02)
BUNDLE = "ab" * 32


class SimDevice:
    """A protocol-speaking device (not a full agent): birth with hardware and plan, telemetry, drift windows."""

    def __init__(self, port: int, device_id: str, hardware: dict, plan: PlanSummary | None = None) -> None:
        self.id, self.topics, self.seq = device_id, Topics(FLEET), 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        will = StateMessage(device_id=device_id, state="offline", birth=1)
        self.client.will_set(self.topics.device(MessageKind.STATE, device_id), encode(will), qos=1, retain=True)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        active = ActiveModel(bundle_id=BUNDLE, model_name="lenet5", slot="a", plan=plan) if plan else None
        self.send(MessageKind.STATE, StateMessage(device_id=device_id, state="online", birth=1, agent_version="sim-1",
                                                  hardware=HardwareInfo(**hardware, device_id=device_id),
                                                  active=active))

    def send(self, kind: MessageKind, message) -> None:
        """Publish with the protocol's QoS/retain rule and a per-connection sequence number; waits for the ack."""
        message = message.model_copy(update={"seq": self.seq})
        self.seq += 1
        rule = DELIVERY[kind]
        info = self.client.publish(self.topics.device(kind, self.id), encode(message), qos=rule.qos, retain=rule.retain)
        if rule.qos:
            info.wait_for_publish(5)

    def telemetry(self, t: float, cpu: float, mem: int, p50_ms: float, inferences: int) -> None:
        self.send(MessageKind.TELEMETRY, TelemetryMessage(device_id=self.id, sent_at=t, mem_available=mem,
                                                          disk_free=1 << 30, cpu_load=cpu, inferences=inferences,
                                                          latency_ms_p50=p50_ms))

    def drift(self, window: int, t: float, agreement: float, shift: float, confidence: float = 0.93) -> None:
        """One drift window report; the alert holds when agreement or input shift leave their bands."""
        bands = {"agreement": (0.95, 1.0), "confidence": (0.8, 1.0), "input_shift": (0.0, 0.3)}
        values = {"agreement": agreement, "confidence": confidence, "input_shift": shift}
        out = [k for k, (lo, hi) in bands.items() if not lo <= values[k] <= hi]
        checks = [DriftCheck(name=k, value=values[k], reference=(lo + hi) / 2, low=lo, high=hi, n=64,
                             in_band=k not in out) for k, (lo, hi) in bands.items()]
        self.send(MessageKind.DRIFT, DriftMessage(
            device_id=self.id, bundle_id=BUNDLE, window_index=window, opened_at=t - 60, closed_at=t, n_samples=200,
            n_shadowed=64, predicted_agreement=0.985, measured_agreement=agreement, mean_confidence=confidence,
            mean_entropy=0.3, input_mean=0.13, input_std=0.3, checks=checks, out_of_band=out,
            consecutive_out_of_band=3 if out else 0, alert=bool(out)))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Fleet:
    """The started server, its HTTP address and an API client."""

    port: int  # the broker's, set by the fixture

    def __init__(self, tmp: Path, broker_url: str) -> None:
        self.server = FleetServer(FleetSettings(data_dir=tmp, broker=broker_url, http_port=0, fleet=FLEET,
                                                analysis=FAST, tick_s=0.5)).start()
        self.http = HttpThread(create_app(self.server), "127.0.0.1", 0).start()
        self.url = self.http.url
        self.token, _ = create_token(self.server.db, role="operator", name="dashboard tests")
        self.api = httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {self.token}"})
        self.analysis_id: str | None = None

    def start_analysis(self) -> None:
        """Register the trained demo LeNet with 80 MNIST digits as its pool and queue its analysis."""
        from toco_core.demo.data import mnist_splits
        from toco_core.demo.train import demo_model

        d = mnist_splits()
        buf = io.BytesIO()
        np.savez(buf, x=d.x_pool[:80], y=d.y_pool[:80])
        r = self.api.post("/api/models", data={"name": "lenet5"},
                          files={"file": ("lenet5.onnx", Path(demo_model("lenet5")).read_bytes()),
                                 "pool": ("pool.npz", buf.getvalue())})
        r.raise_for_status()
        a = self.api.post(f"/api/models/{r.json()['model_id']}/analyses", json={})
        a.raise_for_status()
        self.analysis_id = a.json()["analysis_id"]

    def stop(self) -> None:
        self.api.close()
        self.http.stop()
        self.server.stop()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    """Fleet server on a fresh mosquitto, LeNet analysis queued."""
    if not os.path.exists(MOSQUITTO):
        pytest.fail(f"{MOSQUITTO} is missing: apt-get install mosquitto")
    broker = Broker()
    broker.start()
    f = Fleet(tmp_path_factory.mktemp("dash-fleet"), broker.url)
    f.port = broker.port
    try:
        assert wait_until(lambda: f.api.get("/api/health").json()["broker"] == "connected", 10)
        f.start_analysis()
        yield f
    finally:
        f.stop()
        broker.cleanup()


HARDWARE: dict[str, dict[str, Any]] = {
    "line-pc": {"total_memory": 8 << 30, "available_memory": 5 << 30, "free_storage": 200 << 30, "physical_cores": 4,
                "logical_cores": 8, "cpu_model": "Intel Core i5-8500T", "ort_version": "1.32.0",
                "formats": ["fp32", "qdq_int8", "matmul_nbits4"]},
    "camera-256": {"total_memory": 256 << 20, "available_memory": 120 << 20, "free_storage": 2 << 30,
                   "physical_cores": 2, "logical_cores": 2, "cpu_model": "Cortex-A53", "ort_version": "1.32.0",
                   "formats": ["fp32", "qdq_int8"]},
    # a device-provided string that would run script if the page used innerHTML
    "box-64": {"total_memory": 64 << 20, "available_memory": 30 << 20, "free_storage": 512 << 20,
               "physical_cores": 1, "logical_cores": 1, "cpu_model": "<img src=x onerror=\"window.__pwned=1\">",
               "ort_version": "1.32.0", "formats": ["fp32"]},
}
PLANS = {
    "line-pc": PlanSummary(label="prune 30% / fp32", storage_bytes=151_000, base_file_bytes=248_433,
                           predicted_disagreement=0.004, measured_disagreement=0.006),
    "camera-256": PlanSummary(label="prune 50% + quant s=0.2 / int8", storage_bytes=41_800, base_file_bytes=248_433,
                              predicted_disagreement=0.009, measured_disagreement=0.011, p50_ms=3.25,
                              session_rss=9 << 20),
    "box-64": PlanSummary(label="prune 70% + quant s=0.4 / fp32", storage_bytes=22_500, base_file_bytes=248_433,
                          predicted_disagreement=0.018, measured_disagreement=0.02),
}


@pytest.fixture(scope="session")
def devices(fleet) -> Iterator[dict[str, SimDevice]]:
    """Three devices with births, 20 telemetry points and 12 drift windows each (the camera drifts at the end)."""
    for name in HARDWARE:
        enroll(fleet.server.db, name, "default")
    made = {name: SimDevice(fleet.port, name, hw, PLANS[name]) for name, hw in HARDWARE.items()}
    now = time.time()
    rng = np.random.default_rng(0)
    for k, (name, dev) in enumerate(made.items()):
        for i in range(20):
            dev.telemetry(now - (20 - i) * 30, cpu=float(0.2 + 0.1 * k + 0.05 * rng.random()),
                          mem=int(HARDWARE[name]["available_memory"] * (0.9 + 0.05 * rng.random())),
                          p50_ms=float(2 + 3 * k + rng.random()), inferences=100 * i)
        for w in range(12):
            drifting = name == "camera-256" and w >= 9
            dev.drift(w, now - (12 - w) * 60,
                      agreement=float(0.99 - 0.005 * rng.random() - (0.05 * (w - 8) if drifting else 0)),
                      shift=float(0.05 + 0.03 * rng.random() + (0.15 * (w - 8) if drifting else 0)))
    assert wait_until(lambda: len(fleet.api.get("/api/drift").json()) >= 36, 15), "the server did not store the drift"
    yield made
    for dev in made.values():
        dev.close()


def log_in(pg, url: str, token: str) -> None:
    """Log a page in through the dashboard's login form (the session cookie is the context's from then on)."""
    pg.goto(url + "/login")
    pg.fill("#token", token)
    pg.click("button[type=submit]")
    pg.wait_for_url(url + "/", timeout=10_000)


@pytest.fixture
def page(browser, fleet, request):
    """A fresh page (1400x900), logged in with the fleet's operator token; browser console errors fail the
    test unless it empties ``page.console_errors``."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    log_in(pg, fleet.url, fleet.token)
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.console_errors = errors
    yield pg
    ctx.close()
    assert not errors, f"browser errors: {errors}"


def screenshot(page, tmp_path: Path, name: str) -> Path:
    """Full-page screenshot in the test's tmp dir, copied to tests/dashboard/artifacts/."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)
    return path
