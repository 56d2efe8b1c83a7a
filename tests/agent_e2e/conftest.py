"""Real parts for the agent end-to-end tests: mosquitto, signed LeNet-5 bundles, a publisher
with per-bundle fault injection, agent processes started with ``python -m agent.cli run``."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fleet_server.bundle_publisher import MqttBundleServer
from tests.support.broker import MOSQUITTO, Broker, Listener
from tests.support.processes import free_port, stop_process
from tests.support.waiting import wait_until
from toco_core.analysis_result import save_result
from toco_core.bundle import generate_private_key, make_manifest, pack_bundle, save_public_key
from toco_core.calibration import CalibrationCurve
from toco_core.messages import DeployCommand, MessageKind, StatusMessage, encode, parse_message
from toco_core.model_bundle import BundleInfo, bundle_files
from toco_core.onnx_model import model_hash
from toco_core.preprocessing import Preprocessing
from toco_core.topics import Topics

REPO = Path(__file__).resolve().parents[2]
FLEET = "e2e"
CHUNK = 64 * 1024
__all__ = ["Broker", "Listener", "wait_until"]


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    key = generate_private_key()
    save_public_key(key, d / "server.pub")
    return key, d / "server.pub"


@pytest.fixture(scope="session")
def analysis_dirs(tmp_path_factory, lenet5_analysis):
    """The shared analysis saved twice: as measured, and with curves that claim 0 disagreement."""
    root = tmp_path_factory.mktemp("analysis")
    good = save_result(lenet5_analysis, root / "good")
    lying = {k: CalibrationCurve(operator=c.operator, samples=c.samples,
                                 points=[p.model_copy(update={"disagreement": 0.0}) for p in c.points])
             for k, c in lenet5_analysis.curves.items()}
    bad = save_result(lenet5_analysis.__class__(**{**lenet5_analysis.__dict__, "curves": lying}), root / "lying")
    return good, bad


class Bundles:
    """Builds signed bundles of the demo CNN; ``pad`` adds a random file to make them bigger."""

    def __init__(self, model_path: Path, dirs: tuple[Path, Path], key) -> None:
        self.model_path, self.dirs, self.key = Path(model_path), dirs, key

    def make(self, reason: str, pad: int = 0, lying: bool = False, key=None) -> tuple:
        info = BundleInfo(model_name="lenet5", model_sha256=model_hash(self.model_path.read_bytes()), reason=reason,
                          preprocessing=Preprocessing(size=(28, 28), color="grayscale"))
        files = bundle_files(self.model_path, self.dirs[1] if lying else self.dirs[0], info)
        if pad:
            files["padding.bin"] = np.random.default_rng(len(reason)).bytes(pad)
        data = pack_bundle(files)
        return make_manifest(data, CHUNK, private_key=key or self.key), data


@pytest.fixture(scope="session")
def bundles(lenet5_path, analysis_dirs, keys) -> Bundles:
    return Bundles(lenet5_path, analysis_dirs, keys[0])


class Faults:
    """Per-bundle chunk faults for the publisher: fn(index, payload) -> payload or None (drop)."""

    def __init__(self) -> None:
        self.by_bundle: dict[str, Callable[[int, bytes], bytes | None]] = {}

    def __call__(self, bundle_id: str, index: int, payload: bytes) -> bytes | None:
        fn = self.by_bundle.get(bundle_id)
        return payload if fn is None else fn(index, payload)


_LAST_SEQ = [0]


def next_sequence() -> int:
    """A command sequence above every earlier one of this test run (the server's clock rule)."""
    _LAST_SEQ[0] = max(_LAST_SEQ[0] + 1, int(time.time() * 1e6))
    return _LAST_SEQ[0]


def signed(key, device: str, cmd, *, sequence: int | None = None, expires_in: float = 3600.0):
    """``cmd`` signed by ``key`` for ``device`` as the fleet server signs it (toco_core.command_signing)."""
    from toco_core.command_signing import sign_command

    return sign_command(cmd, key, device_id=device, sequence=sequence or next_sequence(),
                        expires_at=time.time() + expires_in)


class Fleet:
    """Broker + publisher + listener: the server side of the tests; ``key`` signs the commands."""

    def __init__(self, key=None) -> None:
        self.key = key
        self.broker = Broker()
        self.broker.start()
        self.topics = Topics(FLEET)
        self.faults = Faults()
        self.server = MqttBundleServer(self.broker.url, FLEET, fault=self.faults)
        self.server.start()
        self.listener = Listener(self.broker.port, [f"{self.topics.prefix}/devices/#"])

    @property
    def publisher(self):
        return self.server.publisher

    def announce(self, manifest, data) -> None:
        self.publisher.announce(manifest, data)

    def deploy(self, device: str, bundle_id: str, deployment_id: str) -> None:
        self.command(device, DeployCommand(cmd_id=f"c-{deployment_id}", deployment_id=deployment_id,
                                           bundle_id=bundle_id))

    def command(self, device: str, cmd, key=None, **envelope) -> None:
        """Publish ``cmd`` on ``device``'s command topic, signed by ``key`` (default: the fleet's) for it;
        ``envelope`` overrides sign_command's values (sequence, expires_in)."""
        self.listener.publish(self.topics.device(MessageKind.CMD, device),
                              encode(signed(key or self.key, device, cmd, **envelope)))

    def messages(self, device: str, kind: str) -> list:
        return [parse_message(kind, p) for p in self.listener.on(f"/devices/{device}/{kind}")]

    def statuses(self, device: str, deployment_id: str | None = None) -> list[StatusMessage]:
        return [s for s in self.messages(device, "status") if deployment_id is None or s.deployment_id == deployment_id]

    def wait_phase(self, device: str, deployment_id: str, phases: set[str], timeout: float = 60) -> StatusMessage:
        found: list[StatusMessage] = []

        def seen() -> bool:
            found[:] = [s for s in self.statuses(device, deployment_id) if s.phase.value in phases]
            return bool(found)

        assert wait_until(seen, timeout, 0.1), (phases, [(s.phase.value, s.reason, s.detail)
                                                         for s in self.statuses(device, deployment_id)])
        return found[0]

    def close(self) -> None:
        self.listener.close()
        self.server.stop()
        self.broker.cleanup()


@pytest.fixture(scope="module")
def fleet(keys) -> Iterator[Fleet]:
    if not os.path.exists(MOSQUITTO):
        pytest.fail(f"{MOSQUITTO} is missing: apt-get install mosquitto")
    f = Fleet(keys[0])
    yield f
    f.close()


def free_api_port() -> int:
    return free_port()


class AgentProcess:
    """``python -m agent.cli run --config FILE`` with its own state dir; log in state_dir/agent.log.

    ``fleet`` is the topic root's fleet name (a fleet server's ``fleet`` setting); ``extra`` are more
    config keys, a dict one a TOML table, ``drift`` the [drift] section.
    """

    def __init__(self, root: Path, device: str, broker_url: str, public_key: Path, fleet: str = FLEET,
                 **extra) -> None:
        self.root, self.device = root, device
        self.state_dir = root / "state"
        self.port = free_api_port()
        self.config = root / "agent.toml"
        drift = extra.pop("drift", {})
        lines = [f'device_id = "{device}"', f'fleet = "{fleet}"', f'broker_url = "{broker_url}"',
                 f'state_dir = "{self.state_dir}"', f'public_key = "{public_key}"', f"api_port = {self.port}",
                 "telemetry_seconds = 2", "probe_benchmark = false", "threads = 1"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items() if not isinstance(v, dict)]
        for k, v in extra.items():
            if isinstance(v, dict):
                lines.append(f"{k} = {{ {', '.join(f'{a} = {json.dumps(b)}' for a, b in v.items())} }}")
        if drift:
            lines += ["[drift]", *(f"{k} = {json.dumps(v)}" for k, v in drift.items())]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log = open(self.root / "agent.log", "ab")  # noqa: SIM115 - the agent process writes it
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                                     cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        assert wait_until(lambda: self.get("/v1/health")[0] == 200, 30, 0.1), self.log_text()
        # Subscribed to its commands: the daemon rewrites status.json at least every telemetry tick.
        assert wait_until(self._connected, 30, 0.1), self.log_text()
        time.sleep(0.3)

    def _connected(self) -> bool:
        try:
            st = json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return False
        return st["connected"] and self.proc is not None and st["pid"] == self.proc.pid

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except OSError:
            return 0, {}

    def infer(self, x: np.ndarray) -> dict:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(x, np.float32))
        req = urllib.request.Request(self.url + "/v1/infer", data=buf.getvalue(),
                                     headers={"Content-Type": "application/x-npy"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def kill9(self) -> None:
        assert self.proc is not None, "start() first"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        code = stop_process(self.proc, 20)
        self.log.close()
        return code if code is not None else 0

    def log_text(self, tail: int | None = 4000) -> str:
        path = self.root / "agent.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text[-tail:] if tail else text

    def served_model(self) -> bytes:
        ptr = json.loads((self.state_dir / "active.json").read_text())
        return (self.state_dir / "slots" / ptr["slot"] / "model.onnx").read_bytes()


def drop_from(first: int, gate: threading.Event) -> Callable[[int, bytes], bytes | None]:
    """Fault: while ``gate`` is set, chunks >= first are dropped (the transfer stalls there)."""
    return lambda i, payload: None if gate.is_set() and i >= first else payload


def cleanup_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def wait_for(cond, timeout=30.0, step=0.1):
    return wait_until(cond, timeout, step)


def now() -> float:
    return time.monotonic()
