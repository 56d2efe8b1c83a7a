"""Fleet server load benchmark: simulated devices (protocol-speaking paho clients, not agents)
against a real mosquitto + the fleet server (its own process), all on loopback.

1. N devices (default 1,000) send births, telemetry every 10 s and drift reports every 60 s
   for --duration s; measured: messages lost (sent vs received by the server), server CPU and
   RSS, p50/p99 latency of GET /api/devices (the overview) polled meanwhile.
2. A bundle deployment to 200 of them at once: each requests its part ranges, waits for them and
   reports received -> downloading -> verified -> active; measured: time to all-complete.

Every device has an MQTT connection of its own (client id, will, subscriptions), so the broker and
the server see 1,000 sessions; the deployed devices fetch the parts bundle (all but its optional
fp32 part) by ranges on their own part topics, as agents do.
Run: ``.venv/bin/python bench/fleet.py`` (about 3 min) or ``--quick`` (200 devices, 30 s).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.broker import Broker  # noqa: E402
from tests.support.processes import free_port  # noqa: E402
from toco_core.messages import (  # noqa: E402
    MAX_RANGE_LENGTH,
    MAX_RANGES_PER_REQUEST,
    BundleManifest,
    DeployCommand,
    DriftMessage,
    HardwareInfo,
    MessageKind,
    PartRange,
    PartRequest,
    StateMessage,
    StatusMessage,
    TelemetryMessage,
    encode,
    parse_message,
)
from toco_core.topics import Topics  # noqa: E402

FLEET = "bench"
HW = {"total_memory": 512 << 20, "available_memory": 300 << 20, "free_storage": 1 << 30, "physical_cores": 1,
      "logical_cores": 1, "cpu_model": "sim", "ort_version": "1.0"}


def run_server(data_dir: str, broker_url: str, http_port: int, groups: dict[str, str]) -> None:
    """Child process: the fleet server with small analysis settings, ``groups`` (device -> group) enrolled."""
    from fleet_server.api import create_app
    from fleet_server.config import FleetSettings
    from fleet_server.enrollment import enroll
    from fleet_server.server import FleetServer, HttpThread, freeze_startup_heap
    from toco_core.analysis.settings import AnalysisSettings

    fast = AnalysisSettings(initial_samples=16, samples_per_round=16, max_rounds=1, max_heldout=60, prune_rounds=1,
                            prune_round_samples=16, committee_members=2)
    server = FleetServer(FleetSettings(data_dir=Path(data_dir), broker=broker_url, fleet=FLEET, analysis=fast,
                                       deploy_timeout_s=120))
    for device_id, group in groups.items():  # unenrolled devices would be quarantined and never deployed to
        enroll(server.db, device_id, group)
    server.start()
    HttpThread(create_app(server), "127.0.0.1", http_port).start()
    freeze_startup_heap()  # as `toco-fleet serve` does
    while True:
        time.sleep(3600)


class Totals:
    """Messages sent per kind by every simulated device (one lock: paho threads count concurrently)."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.lock = threading.Lock()

    def count(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.sent[kind] = self.sent.get(kind, 0) + n


class SimBox:
    """One simulated device on an MQTT connection of its own: its own session, client id, will
    (retained offline state) and subscriptions, as an agent has."""

    def __init__(self, port: int, device_id: str, group: str, totals: Totals) -> None:
        self.id, self.t, self.group, self.totals = device_id, Topics(FLEET), group, totals
        self.seq = 0
        self.manifest: BundleManifest | None = None
        self.received = 0
        self.connected = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        offline = StateMessage(device_id=device_id, state="offline", birth=1)
        self.c.will_set(self.t.device(MessageKind.STATE, device_id), encode(offline), qos=1, retain=True)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.connect_async("127.0.0.1", port, 60)
        self.c.loop_start()

    def _on_connect(self, client, userdata, flags, reason, props) -> None:
        client.subscribe(self.t.device(MessageKind.CMD, self.id), 1)
        self.connected.set()

    def send(self, kind: MessageKind, msg, qos: int = 1) -> None:
        self.seq += 1
        self.c.publish(self.t.device(kind, msg.device_id), encode(msg.model_copy(update={"seq": self.seq})), qos=qos,
                       retain=kind is MessageKind.STATE)
        self.totals.count(kind.value)

    def birth(self) -> None:
        self.send(MessageKind.STATE, StateMessage(device_id=self.id, state="online", birth=1, agent_version="sim",
                                                  hardware=HardwareInfo(**HW, device_id=self.id), group=self.group))

    def telemetry(self) -> None:
        self.send(MessageKind.TELEMETRY, TelemetryMessage(device_id=self.id, mem_available=300 << 20, disk_free=1 << 30,
                                                          cpu_load=0.3, inferences=100, latency_ms_p50=2.0), qos=0)

    def drift(self, window: int) -> None:
        now = time.time()
        self.send(MessageKind.DRIFT, DriftMessage(device_id=self.id, window_index=window, opened_at=now - 60, closed_at=now,
                                                  n_samples=256, n_shadowed=26, measured_agreement=0.99,
                                                  predicted_agreement=0.99, mean_confidence=0.9, mean_entropy=0.3,
                                                  input_mean=0.1, input_std=0.3))

    def _on_message(self, client, userdata, msg) -> None:
        where = self.t.parse(msg.topic)
        if where.kind is MessageKind.CMD:
            cmd = parse_message(MessageKind.CMD, msg.payload)
            if isinstance(cmd, DeployCommand):
                threading.Thread(target=self._deploy, args=(cmd,), daemon=True).start()
        elif where.kind is MessageKind.MANIFEST and msg.payload:
            self.manifest = parse_message(MessageKind.MANIFEST, msg.payload)
        elif where.kind is MessageKind.PART:
            self.received += len(msg.payload.partition(b"\n")[2])

    def _status(self, cmd: DeployCommand, phase: str) -> None:
        self.send(MessageKind.STATUS, StatusMessage(device_id=self.id, phase=phase, deployment_id=cmd.deployment_id,
                                                    bundle_id=cmd.bundle_id))

    def _deploy(self, cmd: DeployCommand) -> None:
        """As an agent fetching a whole parts bundle but its optional fp32 part: ranges of its own."""
        self._status(cmd, "received")
        self.c.subscribe([(self.t.manifest(cmd.bundle_id), 1), (self.t.part(cmd.bundle_id, self.id), 1)])
        end = time.monotonic() + 120
        while self.manifest is None and time.monotonic() < end:
            time.sleep(0.05)
        if self.manifest is None:
            return
        self._status(cmd, "downloading")
        ranges = [PartRange(part=f.name, offset=o, length=min(MAX_RANGE_LENGTH, f.size - o))
                  for f in self.manifest.files if f.name != "base" for o in range(0, f.size, MAX_RANGE_LENGTH)]
        want = sum(r.length for r in ranges)
        for i in range(0, len(ranges), MAX_RANGES_PER_REQUEST):
            req = PartRequest(device_id=self.id, bundle_id=cmd.bundle_id, ranges=ranges[i:i + MAX_RANGES_PER_REQUEST])
            self.c.publish(self.t.get(cmd.bundle_id, self.id), encode(req), qos=1)
        while self.received < want and time.monotonic() < end:
            time.sleep(0.05)
        self.totals.count("part_bytes", self.received)
        for phase in ("verified", "self_test", "active"):
            self._status(cmd, phase)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def make_token(data_dir: str) -> str:
    """An operator API token in the server's database, made before the server starts (as an operator would)."""
    from fleet_server.auth import create_token
    from fleet_server.config import FleetSettings
    from fleet_server.db import Database

    db = Database(FleetSettings(data_dir=Path(data_dir)).database_url)
    try:
        return create_token(db, role="operator", name="bench")[0]
    finally:
        db.close()


def poll_api(url: str, token: str, stop, out) -> None:
    """Child process: GET /api/devices every 0.25 s until ``stop`` is set; the latencies (ms) go to ``out``.

    A process of its own, so the simulated devices' publishing does not hold the poller's GIL
    and the figure is the server's latency, not the bench's.
    """
    lat = []
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as api:
        while not stop.is_set():
            t0 = time.perf_counter()
            api.get("/api/devices").raise_for_status()
            lat.append(1000 * (time.perf_counter() - t0))
            stop.wait(0.25)
    out.put(lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=130.0, help="seconds of steady traffic")
    ap.add_argument("--telemetry-s", type=float, default=10.0)
    ap.add_argument("--drift-s", type=float, default=60.0)
    ap.add_argument("--deploy-devices", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="200 devices, 30 s, drift every 15 s")
    args = ap.parse_args()
    if args.quick:
        args.devices, args.duration, args.drift_s, args.deploy_devices = 200, 30.0, 15.0, 100
    broker = Broker()
    broker.start()
    tmp = tempfile.mkdtemp(prefix="toco-bench-")
    token = make_token(tmp)  # before the server starts, as an operator makes the first one
    http_port = free_port()
    ids = [f"dev{i:04d}" for i in range(args.devices)]
    # the first --deploy-devices devices form group "deploy"
    groups = {d: "deploy" if i < args.deploy_devices else "bench" for i, d in enumerate(ids)}
    proc = mp.get_context("spawn").Process(target=run_server, args=(tmp, broker.url, http_port, groups))
    proc.start()
    url = f"http://127.0.0.1:{http_port}"
    api = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {token}"})
    for _ in range(300):
        try:
            if api.get("/api/health").json()["broker"] == "connected":
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    ps = psutil.Process(proc.pid)
    totals = Totals()
    t_conn = time.monotonic()
    boxes = [SimBox(broker.port, d, groups[d], totals) for d in ids]
    if not all(b.connected.wait(max(0.1, 120 - (time.monotonic() - t_conn))) for b in boxes):
        raise SystemExit(f"only {sum(b.connected.is_set() for b in boxes)} of {len(boxes)} devices connected in 120 s")
    connect_s = time.monotonic() - t_conn
    print(f"{len(boxes)} devices connected, one MQTT connection each, in {connect_s:.1f} s", flush=True)
    ctx = mp.get_context("spawn")
    stop, lat_q = ctx.Event(), ctx.Queue()
    poller = ctx.Process(target=poll_api, args=(url, token, stop, lat_q), daemon=True)
    ps.cpu_percent()
    cpu0 = sum(ps.cpu_times()[:2])
    t_start = time.monotonic()
    for b in boxes:
        b.birth()
    poller.start()
    next_tel, next_drift, window, rss = t_start, t_start + args.drift_s, 0, 0
    while time.monotonic() - t_start < args.duration:
        now = time.monotonic()
        if now >= next_tel:
            for b in boxes:
                b.telemetry()
            next_tel += args.telemetry_s
        if now >= next_drift:
            for b in boxes:
                b.drift(window)
            window, next_drift = window + 1, next_drift + args.drift_s
        rss = max(rss, ps.memory_info().rss + sum(ch.memory_info().rss for ch in ps.children(recursive=True)))
        time.sleep(0.05)
    elapsed = time.monotonic() - t_start
    sent = {k: v for k, v in totals.sent.items() if k != "part_bytes"}
    time.sleep(3)  # let the server drain its ingest queue
    cpu = 100 * (sum(ps.cpu_times()[:2]) - cpu0) / (elapsed + 3)
    stop.set()
    lat: list[float] = lat_q.get(timeout=60)
    poller.join(5)
    got = api.get("/api/health").json()["messages"]
    print(f"traffic phase done after {elapsed:.0f} s; analysing the demo model for the deployment", flush=True)
    lost = {k: v - got.get(f"received.{k}", 0) for k, v in sent.items()}
    dropped = got.get("dropped", 0)
    # --- deployment to many devices at once
    pool = io.BytesIO()
    from toco_core.demo.data import mnist_splits
    from toco_core.demo.train import demo_model

    d = mnist_splits()
    np.savez(pool, x=d.x_pool[:120], y=d.y_pool[:120])
    m = api.post("/api/models", files={"file": ("m.onnx", Path(demo_model("lenet5")).read_bytes()),
                                       "pool": ("p.npz", pool.getvalue())}, data={"name": "lenet5"}).json()
    a = api.post(f"/api/models/{m['model_id']}/analyses", json={"budget": 0.05}).json()
    t_an = time.monotonic()
    while (a := api.get(f"/api/analyses/{a['analysis_id']}").json())["status"] not in ("done", "failed"):
        if time.monotonic() - t_an > 300:
            raise SystemExit(f"analysis did not finish in 300 s: {a}")
        time.sleep(0.5)
    print(f"analysis {a['status']} in {time.monotonic() - t_an:.0f} s; deploying", flush=True)
    t_dep = time.monotonic()
    # the whole group at once (canary_share 1): this measures transfer + status handling, not staging
    dep = api.post("/api/deployments", json={"analysis_id": a["analysis_id"], "target": {"group": "deploy"},
                                             "canary_share": 1.0}).json()
    n_dep = sum(dep["counts"].values())
    while True:
        cur = api.get(f"/api/deployments/{dep['deployment_id']}").json()
        if cur["stage"] in ("done", "stopped") or time.monotonic() - t_dep > 180:
            break
        time.sleep(0.2)
    dep_s = time.monotonic() - t_dep
    rows = [("devices", args.devices), ("duration s", f"{elapsed:.0f}"), ("messages sent", sum(sent.values())),
            ("messages lost", sum(max(v, 0) for v in lost.values())), ("messages dropped (invalid)", dropped),
            ("server CPU % (of one core)", f"{cpu:.0f}"), ("server peak RSS MB (incl. workers)", f"{rss / 1e6:.0f}"),
            ("GET /api/devices p50 ms", f"{statistics.median(lat):.1f}"),
            ("GET /api/devices p99 ms", f"{np.percentile(lat, 99):.1f}"), ("API samples", len(lat)),
            ("deployment devices", n_dep), ("deployment stage", cur["stage"]), ("deployment counts", cur["counts"]),
            ("deployment time to all-complete s", f"{dep_s:.1f}"),
            ("part bytes received by the deployed devices", totals.sent.get("part_bytes", 0)),
            ("MQTT connections (one per device)", len(boxes)), ("connect time s", f"{connect_s:.1f}")]
    print("| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print(json.dumps({"lost_by_kind": lost}))
    for b in boxes:
        b.close()
    for child in ps.children(recursive=True):  # analysis workers would outlive a terminated server
        child.terminate()
    proc.terminate()
    proc.join(10)
    broker.cleanup()


if __name__ == "__main__":
    main()
