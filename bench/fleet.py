"""Fleet server load benchmark: simulated devices (protocol-speaking paho clients, not agents)
against a real mosquitto + the fleet server (its own process, SQLite), or ``--replicas N`` serve
processes on a throw-away PostgreSQL, all on loopback.

1. N devices (default 1,000) send births, telemetry every 10 s and drift reports every 60 s
   for --duration s; measured: messages lost (sent vs stored in the database), server CPU and
   RSS, p50/p99 latency of GET /api/devices (the overview) polled meanwhile. ``--kill-leader``:
   the replica leading the singleton duties is SIGKILLed halfway; measured: seconds until
   another one leads, and what its death lost. The broker keeps a killed replica's unacknowledged
   messages (and its share of later ones) for its session until it comes back: ``--restart-killed S``
   restarts it S seconds after the kill, as its supervisor would (docs/ops.md).
2. A bundle deployment to 200 of them at once: each requests its part ranges, waits for them and
   reports received -> downloading -> verified -> active; measured: time to all-complete.
   The traffic table is printed before this phase starts; a deployment phase that fails (an HTTP
   error or timeout, a failed analysis) is a row saying what failed, and the bench exits with 1.

Every device has an MQTT connection of its own (client id, will, subscriptions), so the broker and
the server see 1,000 sessions; the deployed devices fetch the parts bundle (all but its optional
fp32 part) by ranges on their own part topics, as agents do.
Run: ``.venv/bin/python bench/fleet.py`` (about 3 min) or ``--quick`` (200 devices, 30 s);
``--replicas 2 --kill-leader`` for two replicas and the leader's death; ``--duration 3600
--sample-seconds 60`` for the server soak (RSS, descriptors, threads, DB size every minute).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import multiprocessing.process
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
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
REPO = Path(__file__).resolve().parents[1]
# small analysis settings: the deployment phase measures transfer, not the analysis
FAST = {"initial_samples": 16, "samples_per_round": 16, "max_rounds": 1, "max_heldout": 60, "prune_rounds": 1,
        "prune_round_samples": 16, "committee_members": 2}
HW = {"total_memory": 512 << 20, "available_memory": 300 << 20, "free_storage": 1 << 30, "physical_cores": 1,
      "logical_cores": 1, "cpu_model": "sim", "ort_version": "1.0"}


def run_server(data_dir: str, broker_url: str, http_port: int) -> None:
    """Child process: the fleet server (SQLite in ``data_dir``) with small analysis settings."""
    from fleet_server.api import create_app
    from fleet_server.config import FleetSettings
    from fleet_server.server import FleetServer, HttpThread, freeze_startup_heap
    from toco_core.analysis.settings import AnalysisSettings

    fast = AnalysisSettings(**FAST)
    server = FleetServer(FleetSettings(data_dir=Path(data_dir), broker=broker_url, fleet=FLEET, analysis=fast,
                                       deploy_timeout_s=120))
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
        self.send(MessageKind.DRIFT, DriftMessage(device_id=self.id, window_index=window, opened_at=now - 60,
                                                  closed_at=now, n_samples=256, n_shadowed=26,
                                                  measured_agreement=0.99,
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
        # no loop_stop: joining 1,000 network threads can hang on one; they are daemons and end with the bench
        self.c.disconnect()


def _ms(v: float) -> str:
    """A latency for the table; an unanswered request (inf) as what it is."""
    return "> 30,000 (unanswered)" if math.isinf(v) else f"{v:.1f}"


def poll_api(url: str, token: str, stop, out) -> None:
    """Child process: GET /api/devices every 0.25 s until ``stop`` is set; the latencies (ms) go to ``out``.

    A process of its own, so the simulated devices' publishing does not hold the poller's GIL
    and the figure is the server's latency, not the bench's.
    """
    lat: list[float] = []
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as api:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                api.get("/api/devices").raise_for_status()
            except httpx.HTTPError:
                # an unanswered request is the worst latency there is, not the end of the measurement: counted
                # as infinite (the table's p99 then says "> 30 s"); at 10,000 devices this box's API stopped
                # answering within 30 s
                lat.append(float("inf"))
            else:
                lat.append(1000 * (time.perf_counter() - t0))
            stop.wait(0.25)
    out.put(lat)


@dataclass
class Servers:
    """The fleet server processes of a run: their API URLs, processes, database URL and an operator token."""

    urls: list[str]
    procs: list[subprocess.Popen | mp.process.BaseProcess]
    db_url: str
    token: str
    cleanup: list = field(default_factory=list)
    launch: Callable[[int], subprocess.Popen] | None = None  # starts replica k (again)

    def alive(self) -> list[psutil.Process]:
        """The processes still running, with their children (analysis workers)."""
        out = []
        for p in self.procs:
            try:
                proc = psutil.Process(p.pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    out += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
        return out

    def health(self, k: int) -> dict:
        """GET /api/health of server k ({} while it does not answer)."""
        try:
            return httpx.get(f"{self.urls[k]}/api/health", timeout=2).json()
        except httpx.HTTPError:
            return {}

    def stop(self) -> None:
        """Terminate every server process and its workers; one still running 10 s later is killed, so a
        server stuck in a long request cannot turn the bench's cleanup into a TimeoutExpired traceback."""
        procs = self.alive()
        for proc in procs:  # analysis workers would outlive a terminated server
            with suppress(psutil.Error):
                proc.terminate()
        for p in self.procs:
            if isinstance(p, mp.process.BaseProcess):
                p.join(10)
                if p.is_alive():
                    print(f"server process {p.pid} did not exit within 10 s of SIGTERM; killed", flush=True)
                    p.kill()
                    p.join(5)
            else:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    print(f"server process {p.pid} did not exit within 10 s of SIGTERM; killed", flush=True)
                    p.kill()
                    p.wait(5)
        for proc in procs:  # workers whose server was killed before it could end them
            with suppress(psutil.Error):
                if proc.is_running():
                    proc.kill()
        for f in self.cleanup:
            f()


def _prepare_db(db_url: str, groups: dict[str, str]) -> str:
    """Schema, the enrolled devices and an operator token in the database, as an operator makes them
    before the server runs (unenrolled devices would be quarantined and never deployed to)."""
    from fleet_server.auth import create_token
    from fleet_server.db import Database
    from fleet_server.enrollment import enroll

    db = Database(db_url)
    try:
        for device_id, group in groups.items():
            enroll(db, device_id, group)
        return create_token(db, role="operator", name="bench")[0]
    finally:
        db.close()


def start_single(tmp: str, broker_url: str, groups: dict[str, str]) -> Servers:
    """One fleet server (SQLite, its own process)."""
    from fleet_server.config import FleetSettings

    db_url = FleetSettings(data_dir=Path(tmp)).database_url
    token = _prepare_db(db_url, groups)
    port = free_port()
    proc = mp.get_context("spawn").Process(target=run_server, args=(tmp, broker_url, port))
    proc.start()
    return Servers([f"http://127.0.0.1:{port}"], [proc], db_url, token)


def start_replicas(n: int, tmp: str, broker_url: str, groups: dict[str, str], stack: ExitStack) -> Servers:
    """``n`` ``toco-fleet serve --replicas`` processes on a throw-away PostgreSQL (tests/fleet/postgres.py)."""
    from tests.fleet.postgres import postgres_cluster

    pg = stack.enter_context(postgres_cluster())
    db_url = pg.create_database("bench")
    token = _prepare_db(db_url, groups)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOCO_FLEET_DEPLOY_TIMEOUT_S": "120",
           **{f"TOCO_FLEET_ANALYSIS__{k.upper()}": str(v) for k, v in FAST.items()}}
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(n)]

    def launch(k: int) -> subprocess.Popen:
        # the same replica id (so the same MQTT client id and broker session) and port on a restart
        log = open(Path(tmp) / f"replica-{k + 1}.log", "ab")  # noqa: SIM115 - the serve process writes it
        return subprocess.Popen([sys.executable, "-m", "fleet_server", "serve", "--fleet", FLEET, "--port",
                                 urls[k].rsplit(":", 1)[1], "--data-dir", str(Path(tmp) / "data"), "--db-url", db_url,
                                 "--broker", broker_url, "--replicas", "--replica-id", f"r{k + 1}"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)

    procs: list[subprocess.Popen | mp.process.BaseProcess] = []
    servers = Servers(urls, procs, db_url, token, launch=launch)
    for k in range(n):
        procs.append(launch(k))
        wait_for(lambda k=k: servers.health(k).get("broker") == "connected", 60, f"replica r{k + 1} did not start")
    return servers


def wait_for(check, timeout: float, what: str) -> float:
    """Poll ``check`` every 0.1 s; the seconds it took. Raises SystemExit with ``what`` on timeout."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(what)
        time.sleep(0.1)
    return time.monotonic() - t0


# paho waits on its sockets with select(), which takes no descriptor above 1023, and a client holds
# three: a process of the bench hosts at most this many devices (one process had 339 of 1,000 connect)
DEVICES_PER_PROCESS = 250


def device_process(port: int, ids: list[str], groups: dict[str, str], conn) -> None:
    """Child process: SimBoxes for ``ids``, driven by (command, arg) over ``conn``: "connect" (answers how
    many connected within ``arg`` s), "birth", "telemetry", "drift" (window ``arg``), "totals" (answers
    the messages sent per kind) and "close"; every command is answered, so the parent keeps the pace."""
    totals = Totals()
    boxes = [SimBox(port, d, groups[d], totals) for d in ids]
    while True:
        cmd, arg = conn.recv()
        if cmd == "connect":
            end = time.monotonic() + arg
            conn.send(sum(b.connected.wait(max(0.0, end - time.monotonic())) for b in boxes))
            continue
        if cmd == "totals":
            with totals.lock:
                conn.send(dict(totals.sent))
            continue
        for b in boxes:
            if cmd == "birth":
                b.birth()
            elif cmd == "telemetry":
                b.telemetry()
            elif cmd == "drift":
                b.drift(arg)
            elif cmd == "close":
                b.close()
        conn.send(None)
        if cmd == "close":
            return


class Devices:
    """The simulated devices, DEVICES_PER_PROCESS per child process."""

    def __init__(self, port: int, ids: list[str], groups: dict[str, str]) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for i in range(0, len(ids), DEVICES_PER_PROCESS):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=device_process, args=(port, ids[i:i + DEVICES_PER_PROCESS], groups, child),
                               daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def ask(self, cmd: str, arg=None) -> list:
        """Send ``cmd`` to every device process; their answers."""
        for c in self.conns:
            c.send((cmd, arg))
        return [c.recv() for c in self.conns]

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for sent in self.ask("totals"):
            for k, v in sent.items():
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        with suppress(EOFError, OSError):  # a device process that died already
            self.ask("close")
        for p in self.procs:
            p.join(5)


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    """User + system CPU seconds per process (those that ended meanwhile left out)."""
    out = {}
    for p in procs:
        try:
            out[p.pid] = sum(p.cpu_times()[:2])
        except psutil.Error:
            continue
    return out


def rss_bytes(procs: list[psutil.Process]) -> int:
    """Summed RSS of the processes (those that ended meanwhile left out)."""
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def stored_rows(db_url: str) -> dict[str, int]:
    """What the database holds of the devices' messages: devices (births), telemetry points, drift windows."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return {"state": conn.execute(sa.text("SELECT count(*) FROM devices WHERE birth > 0")).scalar_one(),
                    "telemetry": conn.execute(sa.text("SELECT count(*) FROM telemetry")).scalar_one(),
                    "drift": conn.execute(sa.text("SELECT count(*) FROM drift_reports")).scalar_one()}
    finally:
        engine.dispose()


def db_bytes(db_url: str) -> int:
    """Size of the database: the SQLite file with its WAL and shared-memory files, or PostgreSQL's
    ``pg_database_size`` of the bench database."""
    import sqlalchemy as sa

    url = sa.engine.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        base = Path(url.database or "")
        return sum(f.stat().st_size for f in (base, Path(f"{base}-wal"), Path(f"{base}-shm")) if f.exists())
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar_one())
    finally:
        engine.dispose()


def soak_sample(servers: Servers, elapsed: float) -> dict:
    """One row of the soak table: RSS, descriptors and threads of the server processes, DB size and rows."""
    alive = servers.alive()
    fds = threads = 0
    for p in alive:
        with suppress(psutil.Error):
            fds, threads = fds + p.num_fds(), threads + p.num_threads()
    return {"minute": elapsed / 60, "rss_mb": rss_bytes(alive) / 1e6, "fds": fds, "threads": threads,
            "db_mb": db_bytes(servers.db_url) / 1e6, **stored_rows(servers.db_url)}


def print_soak(samples: list[dict]) -> None:
    """The soak table: every sample as a difference against the first (after warm-up), then the verdict."""
    print("| minute | server RSS MB | ΔRSS MB | fds | threads | DB MB | telemetry rows | drift rows |\n"
          "|---|---|---|---|---|---|---|---|")
    first = samples[0]
    for s in samples:
        print(f"| {s['minute']:.1f} | {s['rss_mb']:.1f} | {s['rss_mb'] - first['rss_mb']:+.1f} | {s['fds']} | "
              f"{s['threads']} | {s['db_mb']:.1f} | {s['telemetry']} | {s['drift']} |")
    last = samples[-1]
    print(f"RSS growth {last['rss_mb'] - first['rss_mb']:+.1f} MB, descriptors {last['fds'] - first['fds']:+d}, "
          f"threads {last['threads'] - first['threads']:+d}, DB {last['db_mb'] - first['db_mb']:+.1f} MB "
          f"over {last['minute'] - first['minute']:.1f} min", flush=True)


def kill_leader(servers: Servers) -> dict:
    """SIGKILL the replica holding the leader lease; the seconds until another one leads."""
    leader = next(k for k in range(len(servers.urls)) if servers.health(k).get("replica", {}).get("leader"))
    servers.procs[leader].kill()
    others = [k for k in range(len(servers.urls)) if k != leader]
    took = wait_for(lambda: any(servers.health(k).get("replica", {}).get("leader") for k in others), 60,
                    "no replica took the lead within 60 s")
    print(f"killed the leader r{leader + 1} (SIGKILL); another replica led after {took:.1f} s", flush=True)
    return {"killed": f"r{leader + 1}", "index": leader, "at": time.monotonic() - took, "takeover_s": took}


def restart_killed(servers: Servers, killed: dict) -> float:
    """Start the killed replica again under its own id; the seconds until it is connected to the broker."""
    assert servers.launch is not None, "only replicas are killed"
    k = killed["index"]
    t0 = time.monotonic()
    servers.procs[k] = servers.launch(k)
    took = wait_for(lambda: servers.health(k).get("broker") == "connected", 60, f"replica r{k + 1} did not restart")
    print(f"restarted r{k + 1}; connected after {took:.1f} s", flush=True)
    return time.monotonic() - t0


class DeployFailed(Exception):
    """The deployment phase could not run to its end: what failed, for the table's row."""


# POST /api/deployments signs and publishes a command per device before it answers: thousands of
# devices on a loaded box take longer than the client's default timeout
DEPLOY_POST_TIMEOUT_S = 600.0


def _checked(r: httpx.Response, what: str) -> dict:
    """The JSON of a 2xx response. Raises DeployFailed naming ``what`` and the server's answer otherwise."""
    if r.is_error:
        raise DeployFailed(f"{what}: HTTP {r.status_code} {r.text[:300]}")
    return r.json()


def deploy_demo_model(api: httpx.Client) -> tuple[dict, float]:
    """Analyse the demo LeNet-5 and deploy it to group "deploy" at once.

    Returns (final deployment, seconds to done). Raises DeployFailed for an HTTP error answer, a failed or
    unfinished analysis; httpx.HTTPError (a timeout, a refused connection) passes through.
    """
    from toco_core.demo.data import mnist_splits
    from toco_core.demo.train import demo_model

    pool = io.BytesIO()
    d = mnist_splits()
    np.savez(pool, x=d.x_pool[:120], y=d.y_pool[:120])
    m = _checked(api.post("/api/models", files={"file": ("m.onnx", Path(demo_model("lenet5")).read_bytes()),
                                                "pool": ("p.npz", pool.getvalue())}, data={"name": "lenet5"}),
                 "POST /api/models")
    a = _checked(api.post(f"/api/models/{m['model_id']}/analyses", json={"budget": 0.05}), "POST analyses")
    t_an = time.monotonic()
    while (a := _checked(api.get(f"/api/analyses/{a['analysis_id']}"), "GET analysis"))["status"] not in (
            "done", "failed"):
        if time.monotonic() - t_an > 300:
            raise DeployFailed(f"analysis did not finish in 300 s: status {a['status']}")
        time.sleep(0.5)
    if a["status"] != "done":
        raise DeployFailed(f"the demo model's analysis failed, nothing to deploy: {a.get('error')}")
    print(f"analysis done in {time.monotonic() - t_an:.0f} s; deploying", flush=True)
    t_dep = time.monotonic()
    # the whole group at once (canary_share 1): this measures transfer + status handling, not staging
    dep = _checked(api.post("/api/deployments", json={"analysis_id": a["analysis_id"], "target": {"group": "deploy"},
                                                      "canary_share": 1.0}, timeout=DEPLOY_POST_TIMEOUT_S),
                   "POST /api/deployments")
    print(f"deployment {dep['deployment_id']} created in {time.monotonic() - t_dep:.1f} s", flush=True)
    while True:
        cur = _checked(api.get(f"/api/deployments/{dep['deployment_id']}"), "GET /api/deployments/{id}")
        if cur["stage"] in ("done", "stopped") or time.monotonic() - t_dep > 180:
            return cur, time.monotonic() - t_dep
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=130.0, help="seconds of steady traffic")
    ap.add_argument("--telemetry-s", type=float, default=10.0)
    ap.add_argument("--drift-s", type=float, default=60.0)
    ap.add_argument("--deploy-devices", type=int, default=200)
    ap.add_argument("--replicas", type=int, default=1, help="N > 1: N serve --replicas processes on PostgreSQL")
    ap.add_argument("--kill-leader", action="store_true", help="with --replicas: SIGKILL the leader halfway")
    ap.add_argument("--restart-killed", type=float, default=None, metavar="S",
                    help="with --kill-leader: start the killed replica again S seconds after the kill")
    ap.add_argument("--quick", action="store_true", help="200 devices, 30 s, drift every 15 s")
    ap.add_argument("--sample-seconds", type=float, default=0.0,
                    help="soak: sample server RSS, descriptors, threads and DB size this often (0: off)")
    args = ap.parse_args()
    if args.quick:
        args.devices, args.duration, args.drift_s, args.deploy_devices = 200, 30.0, 15.0, 100
    with ExitStack() as stack:
        broker = Broker()
        broker.start()
        stack.callback(broker.cleanup)
        tmp = tempfile.mkdtemp(prefix="toco-bench-")
        ids = [f"dev{i:04d}" for i in range(args.devices)]
        # the first --deploy-devices devices form group "deploy"
        groups = {d: "deploy" if i < args.deploy_devices else "bench" for i, d in enumerate(ids)}
        servers = (start_replicas(args.replicas, tmp, broker.url, groups, stack) if args.replicas > 1
                   else start_single(tmp, broker.url, groups))
        stack.callback(servers.stop)
        wait_for(lambda: servers.health(0).get("broker") == "connected", 60, "the server did not start")
        ok = run(args, broker, servers, ids, groups, stack)
    if not ok:
        sys.exit(1)  # after the cleanup: the table said what failed


def print_table(title: str, rows: list[tuple[str, object]]) -> None:
    """A two-column markdown table of (metric, value) under ``title``."""
    print(f"\n{title}\n| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    sys.stdout.flush()


def run(args, broker: Broker, servers: Servers, ids: list[str], groups: dict[str, str], stack: ExitStack) -> bool:
    """Traffic, optionally the leader's death, then the deployment. Prints the traffic table before the
    deployment starts and the deployment's after it; returns False when the deployment phase failed (its
    row says what failed)."""
    url = servers.urls[-1]  # the API the bench uses: with replicas, the one that is never killed
    api = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {servers.token}"})
    t_conn = time.monotonic()
    devices = Devices(broker.port, ids, groups)
    stack.callback(devices.close)
    connected = sum(devices.ask("connect", 120.0))
    if connected < len(ids):
        raise SystemExit(f"only {connected} of {len(ids)} devices connected in 120 s")
    connect_s = time.monotonic() - t_conn
    print(f"{len(ids)} devices connected, one MQTT connection each ({len(devices.procs)} processes), "
          f"in {connect_s:.1f} s", flush=True)
    ctx = mp.get_context("spawn")
    stop, lat_q = ctx.Event(), ctx.Queue()
    poller = ctx.Process(target=poll_api, args=(url, servers.token, stop, lat_q), daemon=True)
    # CPU seconds per server process as last seen (a killed replica keeps what it used before it died)
    cpu0 = cpu_seconds(servers.alive())
    cpu_seen = dict(cpu0)
    t_start = time.monotonic()
    devices.ask("birth")
    poller.start()
    next_tel, next_drift, window, rss, killed, restarted = t_start, t_start + args.drift_s, 0, 0, None, None
    # the first soak sample after a minute: births, first telemetry and the import-time heap are warm-up
    soak: list[dict] = []
    next_sample = t_start + 60 if args.sample_seconds else float("inf")
    while time.monotonic() - t_start < args.duration:
        now = time.monotonic()
        if now >= next_sample:
            soak.append(soak_sample(servers, now - t_start))
            print(f"soak minute {soak[-1]['minute']:.0f}: RSS {soak[-1]['rss_mb']:.1f} MB, "
                  f"DB {soak[-1]['db_mb']:.1f} MB", flush=True)
            next_sample += args.sample_seconds
        if now >= next_tel:
            devices.ask("telemetry")
            next_tel += args.telemetry_s
        if now >= next_drift:
            devices.ask("drift", window)
            window, next_drift = window + 1, next_drift + args.drift_s
        if args.kill_leader and killed is None and now - t_start > args.duration / 2:
            killed = kill_leader(servers)
        if (killed and restarted is None and args.restart_killed is not None
                and now - killed["at"] >= args.restart_killed):
            restarted = restart_killed(servers, killed)
        alive = servers.alive()
        cpu_seen.update(cpu_seconds(alive))
        rss = max(rss, rss_bytes(alive))
        time.sleep(0.05)
    elapsed = time.monotonic() - t_start
    sent = {k: v for k, v in devices.totals().items() if k != "part_bytes"}
    time.sleep(3)  # let the servers drain their ingest queues
    cpu_seen.update(cpu_seconds(servers.alive()))
    cpu = 100 * sum(v - cpu0.get(pid, 0.0) for pid, v in cpu_seen.items()) / (elapsed + 3)
    stop.set()
    lat: list[float] = lat_q.get(timeout=60)
    poller.join(5)
    stored = stored_rows(servers.db_url)
    lost = {k: v - stored.get(k, 0) for k, v in sent.items()}
    dropped = sum(servers.health(k).get("messages", {}).get("dropped", 0) for k in range(len(servers.urls)))
    if len(soak) > 1:  # before the deployment, so its failure cannot lose an hour's table
        print_soak(soak)
    rows = [("devices", args.devices), ("MQTT connections (one per device)", len(ids)),
            ("connect time s", f"{connect_s:.1f}"), ("server processes", len(servers.urls)),
            ("duration s", f"{elapsed:.0f}"), ("messages sent", sum(sent.values())),
            ("messages lost (sent, not in the database)", sum(max(v, 0) for v in lost.values())),
            ("messages dropped (invalid)", dropped),
            ("server CPU % (of one core, all processes)", f"{cpu:.0f}"),
            ("server peak RSS MB (incl. workers)", f"{rss / 1e6:.0f}"),
            ("GET /api/devices p50 ms", _ms(statistics.median(lat)) if lat else "-"),
            ("GET /api/devices p99 ms", _ms(float(np.percentile(lat, 99, method="higher"))) if lat else "-"),
            ("API samples", len(lat)), ("API requests unanswered within 30 s", sum(math.isinf(v) for v in lat))]
    if killed:
        rows += [("leader killed (SIGKILL) at", f"{args.duration / 2:.0f} s"),
                 ("another replica led after s", f"{killed['takeover_s']:.1f}"),
                 ("killed replica restarted", "no" if restarted is None else
                  f"{args.restart_killed:.0f} s after the kill, connected {restarted:.1f} s later")]
    # printed before the deployment phase, so a deployment that fails cannot lose it
    print_table(f"traffic phase ({elapsed:.0f} s)", rows)
    print(json.dumps({"lost_by_kind": lost}), flush=True)
    print(f"analysing the demo model for the deployment to {args.deploy_devices} devices", flush=True)
    t_phase = time.monotonic()
    try:
        cur, dep_s = deploy_demo_model(api)
    except (DeployFailed, httpx.HTTPError) as exc:
        what = str(exc)
        if isinstance(exc, httpx.HTTPError):  # a timeout's message is often empty: name the error and request
            try:
                what = f"{type(exc).__name__} on {exc.request.method} {exc.request.url.path} {what}".strip()
            except RuntimeError:  # an error raised before its request was built
                what = f"{type(exc).__name__} {what}".strip()
        print_table("deployment phase", [("deployment devices", args.deploy_devices),
                                         ("deployment FAILED", f"{what} (after {time.monotonic() - t_phase:.0f} s)")])
        return False
    part_bytes = devices.totals().get("part_bytes", 0)
    print_table("deployment phase", [
        ("deployment devices", sum(cur["counts"].values())), ("deployment stage", cur["stage"]),
        ("deployment counts", cur["counts"]), ("deployment time to all-complete s", f"{dep_s:.1f}"),
        ("part bytes received by the deployed devices", part_bytes)])
    return True


if __name__ == "__main__":
    main()
