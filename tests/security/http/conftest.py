"""The HTTP side of the security suite: a real `toco-fleet serve` process (this checkout's code, run as
``python -m fleet_server``) with API tokens of every role made offline before it starts, as an operator
would; and the LeNet upload. (A folder of its own: tests/security/conftest.py is the MQTT side's.)"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from tests.support.processes import free_port
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[3]
UPLOAD_CAP = 50 << 20


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``toco-fleet ARGS`` in a child process running this checkout's code; ``env`` is added to the environment."""
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "fleet_server", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def make_tokens(data_dir: Path, roles: tuple[str, ...]) -> dict[str, str]:
    """One token per role in the data dir's database, made offline before the server starts (in this process:
    the CLI path, ``toco-fleet tokens create``, is tested on its own)."""
    from fleet_server.auth import create_token
    from fleet_server.config import FleetSettings
    from fleet_server.db import Database

    db = Database(FleetSettings(data_dir=data_dir).database_url)
    try:
        return {role: create_token(db, role=role, name=f"{role} (tests)")[0] for role in roles}
    finally:
        db.close()


class ServerProcess:
    """`toco-fleet serve` on free ports, its data dir, and clients per role."""

    tokens: dict  # role -> token, set by the fixture that makes them

    def __init__(self, data_dir: Path, *extra: str, env: dict | None = None) -> None:
        self.data_dir, self.extra, self.env = data_dir, extra, env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        """Start it and wait until /api/health answers. Raises AssertionError if it does not within 60 s."""
        env = {**os.environ, **self.env,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.log = open(self.data_dir / "server.log", "ab")  # noqa: SIM115 - closed in wait()
        self.proc = proc = subprocess.Popen([sys.executable, "-m", "fleet_server", "serve", "--data-dir",
                                             str(self.data_dir), "--port", str(self.port), "--broker-port",
                                             str(free_port()), *self.extra],
                                            env=env, stdout=self.log, stderr=subprocess.STDOUT)

        def up() -> bool:
            try:
                return httpx.get(self.url + "/api/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        assert wait_until(up, 60, 0.1) and proc.poll() is None, self.output()
        return self

    def client(self, token: str | None) -> httpx.Client:
        """An API client sending ``token`` as a bearer token (None: anonymous)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    @property
    def process(self) -> psutil.Process:
        assert self.proc is not None, "start() first"
        return psutil.Process(self.proc.pid)

    def output(self) -> str:
        path = self.data_dir / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code (killed after ``timeout``)."""
        assert self.proc is not None, "start() first"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def lenet_upload() -> dict:
    """The multipart parts of the demo LeNet with a 120-digit pool."""
    from toco_core.demo.data import mnist_splits
    from toco_core.demo.train import demo_model

    d = mnist_splits()
    buf = io.BytesIO()
    np.savez(buf, x=d.x_pool[:120], y=d.y_pool[:120])
    return {"file": ("lenet5.onnx", Path(demo_model("lenet5")).read_bytes()), "pool": ("pool.npz", buf.getvalue())}


@pytest.fixture(scope="session")
def http_fleet(tmp_path_factory) -> Iterator[ServerProcess]:
    """One server process for the HTTP tests: upload cap 50 MB and an extra trusted host (set as settings, in
    the environment); ``http_fleet.tokens[role]``."""
    data = tmp_path_factory.mktemp("security-http")
    tokens = make_tokens(data, ("viewer", "operator", "admin"))
    srv = ServerProcess(data, env={"TOCO_FLEET_MAX_UPLOAD_BYTES": str(UPLOAD_CAP),
                                   "TOCO_FLEET_TRUSTED_HOSTS": '["fleet.plant.test"]'}).start()
    srv.tokens = tokens
    try:
        yield srv
    finally:
        srv.stop()
