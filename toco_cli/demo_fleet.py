"""The demo's fleet on one machine: a fleet server (embedded broker + SQLite) and real agent
processes (``python -m agent.cli run``), each with its own config, state dir, log and budgets.

Nothing here is simulated: the agents are the daemons an edge box runs, talking MQTT to the
server's broker and serving inference over their loopback HTTP API.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx
import numpy as np

from toco_core.errors import TocoError

if TYPE_CHECKING:
    from fleet_server.server import FleetServer, HttpThread

FLEET = "demo"
log = logging.getLogger("toco.demo.fleet")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class DemoError(TocoError):
    """Raised when a step of the demo story did not happen (the message names the step and the logs)."""

    exit_code = 5


@dataclass(frozen=True)
class DemoDevice:
    """One edge box of the demo: its id, group, budgets and the traffic it sees."""

    device_id: str
    group: str
    role: str
    memory_cap: str | None = None
    storage_cap: str | None = None
    threads: int = 1
    objective: str = "fidelity"
    keep_master: bool = False  # fetch every weight part, so the drift monitor shadows the master


# Three boxes that must end up with three different models from the same analysis. The camera
# box's model storage is sized from the analysis (demo_story.size_camera_box): a fixed number of
# KB lands above the line PC's plan on some machines, where training rounds differently.
DEVICES = (
    DemoDevice("line-pc", "assembly", "roomy line PC with the line camera, no limits", threads=2, keep_master=True),
    DemoDevice("camera-box", "inspection", "256 MB camera box", memory_cap="256MB"),
    DemoDevice("handheld", "mobile", "64 MB one-core handheld, smallest model", memory_cap="64MB", objective="size"),
)
CAMERA = "camera-box"
# The box whose inputs rotate (its camera gets knocked). The line PC, because it has no limits: a
# re-analysis with rotated field samples tightens the tolerances, and a storage cap that gave a
# box its own first plan may then admit no plan within budget.
SHIFTED = "line-pc"


def _stop_with_parent() -> None:
    """In the forked child: SIGTERM when the demo process dies, however it dies (Linux prctl).

    The demo's own shutdown stops its agents; this covers a ``kill -9`` of the demo, which
    would otherwise leave three daemons running. Elsewhere: nothing.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_or_free(port: int, host: str = "127.0.0.1") -> int:
    """``port`` when it can be bound, else a free one (so a busy 8080 does not stop the demo)."""
    if port == 0:
        return free_port(host)
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return free_port(host)
    return port


def _toml_value(v: Any) -> str:
    return json.dumps(str(v)) if isinstance(v, Path) else json.dumps(v)


class AgentProcess:
    """A real ``toco-agent run`` process for one DemoDevice; log in ``root/agent.log``."""

    def __init__(self, device: DemoDevice, root: Path, broker_url: str, public_key: Path, drift: dict) -> None:
        self.device = device
        self.root = root
        self.state_dir = root / "state"
        self.config_path = root / "agent.toml"
        self.api_port = free_port()
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        d = device
        values = {"device_id": d.device_id, "fleet": FLEET, "group": d.group, "broker_url": broker_url,
                  "state_dir": self.state_dir, "public_key": public_key, "api_port": self.api_port,
                  "threads": d.threads, "objective": d.objective, "telemetry_seconds": 3.0,
                  "upload_samples": True, "log_verbosity": 1, "memory_cap": d.memory_cap, "storage_cap": d.storage_cap,
                  "keep_master": d.keep_master or None}
        lines = [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines += ["", "[drift]", *(f"{k} = {_toml_value(v)}" for k, v in drift.items())]
        root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def log_path(self) -> Path:
        return self.root / "agent.log"

    def start(self) -> None:
        """Spawn the daemon (it keeps running until ``stop``)."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_stop_with_parent)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict:
        """The daemon's status.json ({} while it has not written one)."""
        try:
            return json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def infer(self, client: httpx.Client, x: np.ndarray) -> dict:
        """POST one batch (.npy) to the agent's inference API. Raises httpx.HTTPError."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(x, np.float32))
        r = client.post(self.api_url + "/v1/infer", content=buf.getvalue(),
                        headers={"Content-Type": "application/x-npy"})
        r.raise_for_status()
        return r.json()

    def terminate(self) -> None:
        """SIGTERM (the daemon starts its clean shutdown); ``stop`` then waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def stop(self) -> int | None:
        """SIGTERM, wait for the clean shutdown (kill after 25 s: the agent's own stop deadline,
        agent.run.STOP_DEADLINE_S, logs its threads' stacks at 20 s). Returns the exit code."""
        self.terminate()
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(25)
            except subprocess.TimeoutExpired:
                log.warning("agent did not stop within 25 s; killed", extra={"fields": {
                    "device": self.device.device_id, "log": str(self.log_path)}})
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
        return self.proc.returncode if self.proc else None

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the agent's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class DemoFleet:
    """The server, its HTTP API/dashboard and the demo's agents; ``stop()`` ends them all."""

    def __init__(self, workdir: Path, broker: str = "embedded", http_port: int = 8080, analysis=None,
                 drift: dict | None = None) -> None:
        from fleet_server.config import FleetSettings

        self.workdir = workdir
        kw: dict[str, Any] = {"fleet": FLEET, "data_dir": workdir / "fleet", "broker": broker,
                              "broker_port": free_port(), "http_port": port_or_free(http_port),
                              "drift_policy": "auto", "tick_s": 0.5, "samples_wait_s": 15.0, "deploy_timeout_s": 600,
                              "canary_share": 0.34}
        if analysis is not None:
            kw["analysis"] = analysis
        self.settings = FleetSettings(**kw)
        self.drift = drift or {}
        self.server: FleetServer | None = None
        self.http: HttpThread | None = None
        self.api: httpx.Client | None = None
        self.token = ""  # the admin API token start_server makes
        self.agents: dict[str, AgentProcess] = {}
        self.devices: tuple[DemoDevice, ...] = DEVICES  # the camera box's storage is set once analysed

    @property
    def url(self) -> str:
        return self.http.url if self.http else ""

    def start_server(self) -> None:
        """Server with its broker, then the HTTP API and dashboard."""
        from fleet_server.api import create_app
        from fleet_server.auth import create_token
        from fleet_server.server import FleetServer, HttpThread

        self.server = server = FleetServer(self.settings).start()
        self.http = http = HttpThread(create_app(server), self.settings.http_host, self.settings.http_port).start()
        # the API and the dashboard need a token: the demo makes an admin one and prints how to use it
        self.token, _ = create_token(server.db, role="admin", name="demo admin")
        self.api = httpx.Client(base_url=http.url, timeout=60, headers={"Authorization": f"Bearer {self.token}"})

    def start_agents(self) -> None:
        """One agent process per device in ``self.devices``, enrolled in its group and provisioned with the
        server's public key (as an operator does with `toco-fleet devices enroll`; no auto-enroll)."""
        from fleet_server.enrollment import enroll

        server = self.server
        assert server is not None, "start_server() first"
        for d in self.devices:
            enroll(server.db, d.device_id, d.group)
            agent = AgentProcess(d, self.workdir / "agents" / d.device_id, server.broker_url,
                                 server.public_key_path, self.drift)
            agent.start()
            self.agents[d.device_id] = agent

    def call(self, method: str, path: str, **kw) -> Any:
        """One API call; a 4xx/5xx becomes a DemoError with the server's message."""
        assert self.api is not None, "start_server() first"
        r = self.api.request(method, path, **kw)
        if r.status_code >= 400:
            raise DemoError(f"{method} {path} answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def stop(self) -> None:
        """Agents first (they publish offline), then the HTTP server and the fleet server."""
        for agent in self.agents.values():  # all at once: each may take its current job's time to end
            agent.terminate()
        for agent in self.agents.values():
            agent.stop()
        if self.api is not None:
            self.api.close()
        if self.http is not None:
            self.http.stop()
        if self.server is not None:
            self.server.stop()


def wait_for(what: str, check, timeout: float, step: float = 0.5, hint: str = "") -> Any:
    """Poll ``check()`` until it returns something truthy; returns it.

    Raises DemoError naming ``what`` after ``timeout`` seconds.
    """
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise DemoError(f"{what} did not happen within {timeout:.0f} s", hint or None)
        time.sleep(step)

