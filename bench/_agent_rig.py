"""The rig bench/agent.py measures on: the bundle publisher, the deploy
command and status watcher, the signed demo bundle, and process-tree RSS/CPU sampling (with
the bare onnxruntime baseline)."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's packages when run as a script

from bench._common import cached_analysis  # noqa: E402
from toco_core.bundle import make_manifest, pack_bundle  # noqa: E402
from toco_core.demo.data import mnist_splits  # noqa: E402
from toco_core.demo.train import demo_model  # noqa: E402
from toco_core.messages import DeployCommand, MessageKind, encode, parse_message  # noqa: E402
from toco_core.model_bundle import BundleInfo, bundle_files  # noqa: E402
from toco_core.onnx_model import load_model, model_hash  # noqa: E402
from toco_core.preprocessing import Preprocessing  # noqa: E402
from toco_core.topics import Topics  # noqa: E402

FLEET, DEVICE, MB = "bench", "bench-box", 1_000_000



# ---- infrastructure ------------------------------------------------------------------------------
def serve_bundles(url: str, bundles: list[tuple[str, bytes]], ready, stop) -> None:
    """Child process: a MqttBundleServer announcing ``bundles`` (manifest JSON, data) until ``stop``."""
    from fleet_server.bundle_publisher import MqttBundleServer
    from toco_core.messages import parse_message as parse

    server = MqttBundleServer(url, FLEET, client_id=f"bench-server-{os.getpid()}")
    server.start()
    for manifest_json, data in bundles:
        server.publisher.announce(parse(MessageKind.MANIFEST, manifest_json.encode()), data)
    ready.set()
    stop.wait()
    server.stop()


class Publisher:
    """serve_bundles in its own process, like the fleet server on another core."""

    def __init__(self, url: str, bundles: list[tuple]) -> None:
        ctx = mp.get_context("spawn")
        self.ready, self.stop = ctx.Event(), ctx.Event()
        payload = [(m.model_dump_json(), d) for m, d in bundles]
        self.proc = ctx.Process(target=serve_bundles, args=(url, payload, self.ready, self.stop), daemon=True)
        self.proc.start()
        if not self.ready.wait(60):
            raise RuntimeError("the bundle publisher did not start")

    def close(self) -> None:
        self.stop.set()
        self.proc.join(10)


class StatusWatch:
    """Subscribes to the device's status topic and keeps the parsed messages."""

    def __init__(self, port: int, topics: Topics) -> None:
        self.topics = topics
        self.seen: list = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-watch-{os.getpid()}")
        ok = threading.Event()

        def on_connect(c, u, f, rc, p):
            c.subscribe(topics.device(MessageKind.STATUS, DEVICE), 1)
            ok.set()

        self.c.on_connect = on_connect
        self.c.on_message = lambda c, u, m: self.seen.append(parse_message(MessageKind.STATUS, m.payload))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        ok.wait(5)
        time.sleep(0.2)

    def deploy(self, bundle_id: str, key) -> None:
        """Publish a deploy command signed by ``key`` (the bundle's key), as the fleet server would."""
        self.command(DeployCommand(cmd_id="bench-1", deployment_id="bench-dep", bundle_id=bundle_id), key)

    def command(self, cmd, key) -> None:
        """Publish ``cmd`` on the device's command topic, signed by ``key`` for it; waits until sent."""
        from toco_core.command_signing import sign_command

        signed = sign_command(cmd, key, device_id=DEVICE, sequence=int(time.time() * 1e6), expires_at=time.time() + 600)
        self.c.publish(self.topics.device(MessageKind.CMD, DEVICE), encode(signed), qos=1).wait_for_publish(5)

    def phases(self) -> list[str]:
        return [s.phase.value for s in self.seen]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# ---- the demo bundle -----------------------------------------------------------------------------
def demo_bundle(key) -> tuple:
    """Signed LeNet-5 bundle from a short analysis cached under bench/results/analysis-agent-lenet5."""
    from toco_core.analysis.settings import AnalysisSettings
    from toco_core.analysis_result import save_result

    path = demo_model("lenet5")
    model = load_model(path)
    d = mnist_splits()
    settings = AnalysisSettings(max_rounds=3, samples_per_round=48, initial_samples=48)
    result, cached = cached_analysis("agent-lenet5", model, d.x_pool, d.y_pool, settings)
    analysis_dir = save_result(result, Path(tempfile.mkdtemp(prefix="bench-analysis-")))
    info = BundleInfo(model_name="lenet5", model_sha256=model_hash(Path(path).read_bytes()), reason="bench",
                      preprocessing=Preprocessing(size=(28, 28), color="grayscale"))
    data = pack_bundle(bundle_files(path, analysis_dir, info))
    shutil.rmtree(analysis_dir, ignore_errors=True)
    return make_manifest(data, 64 * 1024, private_key=key), data, cached, d


# ---- 1 + 2: the agent ----------------------------------------------------------------------------
def tree_sample(proc: psutil.Process) -> tuple[int, float]:
    """(RSS bytes, CPU seconds) of a process and its children."""
    procs = [proc, *proc.children(recursive=True)]
    rss, cpu = 0, 0.0
    for p in procs:
        try:
            rss += p.memory_info().rss
            t = p.cpu_times()
            cpu += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return rss, cpu


def idle_profile(pid: int, seconds: float) -> dict:
    """Max and mean RSS (MB) and CPU (% of one core) of a process tree over ``seconds``."""
    proc = psutil.Process(pid)
    _, cpu0 = tree_sample(proc)
    t0 = time.monotonic()
    rss = []
    while time.monotonic() - t0 < seconds:
        rss.append(tree_sample(proc)[0])
        time.sleep(0.5)
    _, cpu1 = tree_sample(proc)
    wall = time.monotonic() - t0
    return {"rss_max_mb": max(rss) / MB, "rss_mean_mb": statistics.mean(rss) / MB,
            "cpu_pct": 100 * (cpu1 - cpu0) / wall, "seconds": wall}


BARE = """
import sys, time, onnxruntime as ort, numpy as np
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.zeros([1 if not isinstance(d, int) else d for d in s.get_inputs()[0].shape], np.float32)
s.run(None, {s.get_inputs()[0].name: x})
if sys.argv[2] == "libs":
    import paho.mqtt.client as mqtt, psutil, pydantic
    class Ping(pydantic.BaseModel):
        n: int
    Ping.model_validate_json('{"n": 1}')
    psutil.virtual_memory()
    mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
print("ready", flush=True)
time.sleep(3600)
"""


def bare_idle(model_path: Path, seconds: float, libs: bool = False) -> dict:
    """Baseline: python + onnxruntime + the same model, doing nothing else.

    With ``libs`` it also uses, once each, the libraries the agent is built on
    (a pydantic model validated, a paho client made, psutil asked): the floor below which no
    agent built on them can idle.
    """
    p = subprocess.Popen([sys.executable, "-c", BARE, str(model_path), "libs" if libs else "bare"],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        return idle_profile(p.pid, seconds)
    finally:
        p.kill()
        p.wait(5)
