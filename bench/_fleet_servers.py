"""The fleet servers of bench/fleet.py: one process on SQLite, or ``toco-fleet serve --replicas``
processes on a throw-away PostgreSQL; their processes, health, and the leader's death and restart."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.process
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

from bench._fleet_sim import FLEET
from tests.support.processes import free_port

REPO = Path(__file__).resolve().parents[1]
# small analysis settings: the deployment phase measures transfer, not the analysis
FAST = {"initial_samples": 16, "samples_per_round": 16, "max_rounds": 1, "max_heldout": 60, "prune_rounds": 1,
        "prune_round_samples": 16, "committee_members": 2}

def run_server(data_dir: str, broker_url: str, http_port: int) -> None:
    """Child process: the fleet server (SQLite in ``data_dir``) with small analysis settings."""
    from fleet_server.api import create_app
    from fleet_server.config import FleetSettings
    from fleet_server.serve_process import freeze_startup_heap
    from fleet_server.server import FleetServer, HttpThread
    from toco_core.analysis.settings import AnalysisSettings

    fast = AnalysisSettings(**FAST)
    server = FleetServer(FleetSettings(data_dir=Path(data_dir), broker=broker_url, fleet=FLEET, analysis=fast,
                                       deploy_timeout_s=120))
    server.start()
    HttpThread(create_app(server), "127.0.0.1", http_port).start()
    freeze_startup_heap()  # as `toco-fleet serve` does
    while True:
        time.sleep(3600)


@dataclass
class Servers:
    """The fleet server processes of a run: their API URLs, processes, database URL and an operator token."""

    urls: list[str]
    procs: list[subprocess.Popen | mp.process.BaseProcess]
    db_url: str
    token: str
    cleanup: list = field(default_factory=list)
    launch: Callable[[int], subprocess.Popen] | None = None  # starts replica k (again)
    logs: dict[int, Path] = field(default_factory=dict)  # replica k's stdout and stderr

    def alive(self) -> list[psutil.Process]:
        """The processes still running, with their children (analysis workers)."""
        return [p for procs in self.by_server() for p in procs]

    def by_server(self) -> list[list[psutil.Process]]:
        """Per server (replica): its process and children while it runs, [] once it has ended."""
        out: list[list[psutil.Process]] = []
        for p in self.procs:
            try:
                proc = psutil.Process(p.pid)
                out.append([proc, *proc.children(recursive=True)] if proc.status() != psutil.STATUS_ZOMBIE else [])
            except psutil.Error:
                out.append([])
        return out

    def health(self, k: int) -> dict:
        """GET /api/health of server k ({} while it does not answer)."""
        try:
            return httpx.get(f"{self.urls[k]}/api/health", timeout=2).json()
        except httpx.HTTPError:
            return {}

    def _dump_and_kill(self, p: subprocess.Popen) -> None:
        """A replica that ignored SIGTERM for 10 s: SIGABRT makes its faulthandler (PYTHONFAULTHANDLER) write
        every thread's stack to its log, which is printed, so the thread that blocks the shutdown is named."""
        print(f"server process {p.pid} did not exit within 10 s of SIGTERM; its threads' stacks:", flush=True)
        p.send_signal(signal.SIGABRT)
        with suppress(subprocess.TimeoutExpired):
            p.wait(10)
        k = next((k for k, q in enumerate(self.procs) if q is p), None)
        log = self.logs.get(k) if k is not None else None
        if log is not None and log.exists():
            text = log.read_text(errors="replace")
            at = text.rfind("Fatal Python error: Aborted")
            print(text[at:] if at >= 0 else text[-6000:], flush=True)
        if p.poll() is None:
            p.kill()
            p.wait(5)

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
                    self._dump_and_kill(p)
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


def start_replicas(broker_urls: list[str], tmp: str, groups: dict[str, str], stack: ExitStack) -> Servers:
    """A ``toco-fleet serve --replicas`` process per broker URL (each its own MQTT user) on a throw-away
    PostgreSQL (tests/fleet/postgres.py)."""
    from tests.fleet.postgres import postgres_cluster

    pg = stack.enter_context(postgres_cluster())
    db_url = pg.create_database("bench")
    token = _prepare_db(db_url, groups)
    # each replica's password where the others read it: the leader drains a dead replica's broker session
    # logged in as that replica's user (fleet_server.session_drain)
    peers = Path(tmp) / "peer-passwords"
    peers.mkdir(mode=0o700, exist_ok=True)
    for url in broker_urls:
        parsed = urlsplit(url)
        (peers / f"{parsed.username}.password").write_text(f"{parsed.password}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOCO_FLEET_DEPLOY_TIMEOUT_S": "120", "PYTHONFAULTHANDLER": "1",
           "TOCO_FLEET_MQTT_PEER_PASSWORD_DIR": str(peers),
           **{f"TOCO_FLEET_ANALYSIS__{k.upper()}": str(v) for k, v in FAST.items()}}
    n = len(broker_urls)
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(n)]

    def launch(k: int) -> subprocess.Popen:
        # the same replica id (so the same MQTT client id and broker session) and port on a restart
        # the URL carries the replica's bench password (visible in ps: a throw-away broker's, nothing else)
        servers.logs[k] = Path(tmp) / f"replica-{k + 1}.log"
        log = open(servers.logs[k], "ab")  # noqa: SIM115 - the serve process writes it
        return subprocess.Popen([sys.executable, "-m", "fleet_server", "serve", "--fleet", FLEET, "--port",
                                 urls[k].rsplit(":", 1)[1], "--data-dir", str(Path(tmp) / "data"), "--db-url", db_url,
                                 "--broker", broker_urls[k], "--replicas", "--replica-id", f"r{k + 1}"], env=env,
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


