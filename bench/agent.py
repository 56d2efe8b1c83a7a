"""Benchmark of the edge agent, every number next to a baseline measured in the same run.

    .venv/bin/python bench/agent.py [--idle-seconds 20] [--requests 500] [--skip-agent]

1. Idle RSS and CPU of ``toco-agent run`` (a child process) after a real deployment: a local
   mosquitto, a signed LeNet-5 bundle (demo model + a short cached analysis under
   bench/results/) served by fleet_server's MqttBundleServer, a deploy command; once the
   agent reports ``active`` and has served the API requests of (2) (its drift worker then
   holds the shadow session of the base model), it idles past its ``shadow_idle_seconds``
   (10 s here) and RSS (process tree) and CPU time are sampled with psutil over
   ``--idle-seconds``. RSS while serving is shown too. Baselines: a bare python with
   onnxruntime and the same model loaded; and the floor, that same process after it has used
   pydantic, paho-mqtt and psutil once each (the libraries the agent is built on).
2. Inference API overhead: ``--requests`` POST /v1/infer (batch 1, .npy body, keep-alive)
   against a bare onnxruntime session of the model the agent serves (p50/p99).
3. Recompression time per 1M compressible parameters: toco_core.recompress.recompress on the
   demo MLP (this box's probed profile). Baseline: onnxruntime quantize_dynamic of the same model.
4. Transfer of a 20 MB bundle over loopback mosquitto: BundleDownloader (publisher in its own
   process, 256 KiB chunks) vs mosquitto_pub -f of the same bytes to mosquitto_sub (median of 3).
5. Checking a signed command (bench/_command_cost.py, a fresh process with the daemon's modules):
   the agent's way, the signature in a child task, per-command latency and daemon RSS; baseline
   in the same process: cryptography's Ed25519 imported into the daemon, its RSS and latency.
   ``--commands-only`` runs just this one.

Prints a rich table and writes bench/results/agent.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/_common and the checkout's packages when run as a script

from bench._agent_rig import DEVICE, FLEET, MB, Publisher, StatusWatch, bare_idle, demo_bundle, idle_profile  # noqa: E402
from bench._common import RESULTS, cached_analysis  # noqa: E402
from tests.support.broker import MOSQUITTO, Broker  # noqa: E402  (the tests' mosquitto)
from tests.support.processes import free_port, stop_process  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402
from toco_core.bundle import generate_private_key, make_manifest, pack_bundle, save_public_key  # noqa: E402
from toco_core.demo.train import demo_model  # noqa: E402
from toco_core.onnx_model import compressible_weights, load_model  # noqa: E402
from toco_core.topics import Topics  # noqa: E402

SHADOW_IDLE_S = 10.0  # the agent's shadow_idle_seconds here (default 60 s), to keep the bench short
TARGETS = {"idle_rss_mb": 80.0, "idle_cpu_pct": 1.0, "api_overhead_p50_ms": 1.0, "transfer_ratio": 0.5}
console = Console(width=150)  # the table stays readable when piped into a log


# ---- 1 and 2: the running agent, idle and serving -----------------------------------------------
def api_latency(port: int, x: np.ndarray, n: int) -> list[float]:
    """Client-side seconds of ``n`` POST /v1/infer (npy body) on one keep-alive connection."""
    buf = io.BytesIO()
    np.save(buf, x)
    body = buf.getvalue()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": "application/x-npy"})
        r = conn.getresponse()
        payload = r.read()
        dt = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"/v1/infer answered {r.status}: {payload[:200]!r}")
        if i >= 20:  # warm-up excluded
            times.append(dt)
    conn.close()
    return times


def bare_latency(model: bytes, x: np.ndarray, n: int) -> list[float]:
    """Seconds of ``n`` bare onnxruntime runs of the same model and input."""
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    times = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        s.run(None, {name: x})
        if i >= 20:
            times.append(time.perf_counter() - t0)
    return times


def pct(times: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(times), q))


def agent_run(broker: Broker, key, manifest, data, digits, idle_s: float, n: int, work: Path) -> dict:
    """Deploy the demo bundle to a real ``toco-agent run`` and measure it idle, then its API."""
    work.mkdir(parents=True, exist_ok=True)
    public = work / "fleet.pub"
    save_public_key(key, public)
    api_port = free_port()
    state = work / "state"
    config = work / "agent.toml"
    config.write_text("\n".join([f'device_id = "{DEVICE}"', f'fleet = "{FLEET}"', f'broker_url = "{broker.url}"',
                                 f'state_dir = "{state}"', f'public_key = "{public}"', f"api_port = {api_port}",
                                 f"shadow_idle_seconds = {SHADOW_IDLE_S}"]) + "\n")
    exe = Path(sys.executable).with_name("toco-agent")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli"]
    log = open(work / "agent.log", "wb")  # noqa: SIM115 - the agent process writes it until it ends
    agent = subprocess.Popen([*cmd, "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=work)
    publisher = Publisher(broker.url, [(manifest, data)])
    watch = StatusWatch(broker.port, Topics(FLEET))
    out: dict = {}
    try:
        t0 = time.monotonic()
        watch.deploy(manifest.bundle_id, key)
        done = wait_until(lambda: {"active", "failed", "refused", "rolled_back"} & set(watch.phases()), 300, 0.2)
        out["deploy_s"] = time.monotonic() - t0
        if not done or "active" not in watch.phases():
            tail = (work / "agent.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"the agent did not activate the bundle: phases {watch.phases()}\n{tail}")
        out["phases"] = watch.phases()
        slot = json.loads((state / "active.json").read_text())["slot"]
        served = (state / "slots" / slot / "model.onnx").read_bytes()
        x = digits.x_heldout[:1].astype(np.float32)
        # traffic first: the drift worker loads the shadow (base) session, as on a box in use
        api = api_latency(api_port, x, n)
        out["serving"] = idle_profile(agent.pid, 2.0)
        # then idle: the shadow session goes after shadow_idle_seconds without traffic
        time.sleep(SHADOW_IDLE_S + 3.0)
        out["idle"] = idle_profile(agent.pid, idle_s)
        bare = bare_latency(served, x, n)
        out["api"] = {"p50_ms": pct(api, 50) * 1e3, "p99_ms": pct(api, 99) * 1e3}
        out["bare"] = {"p50_ms": pct(bare, 50) * 1e3, "p99_ms": pct(bare, 99) * 1e3}
        out["served_model_bytes"] = len(served)
        served_path = work / "served.onnx"
        served_path.write_bytes(served)
        out["bare_idle"] = bare_idle(served_path, idle_s)
        out["libs_idle"] = bare_idle(served_path, idle_s, libs=True)
    finally:
        watch.close()
        publisher.close()
        out["exit_code"] = stop_process(agent, 30)
        log.close()
    return out


# ---- 3: recompression ---------------------------------------------------------------------------
def recompression(digits) -> dict:
    """Seconds of recompress() on the demo MLP per 1M compressible parameters, and quantize_dynamic's."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from toco_core.analysis.settings import AnalysisSettings
    from toco_core.plan import Policy
    from toco_core.probe import probe_device
    from toco_core.recompress import recompress

    path = demo_model("mlp")
    model = load_model(path)
    settings = AnalysisSettings(max_rounds=2, samples_per_round=48, initial_samples=48)
    result, _ = cached_analysis("agent-mlp", model, digits.x_pool, digits.y_pool, settings)
    params = sum(int(np.prod(i.shape)) for i in compressible_weights(model))
    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        profile = probe_device(Path(tmp), benchmark=False, device_id="bench-box")  # this box, as the agent sees it
    t0 = time.perf_counter()
    _, report = recompress(model, result, profile, Policy(budget=0.01))
    toco_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench-qd-") as tmp:
        t0 = time.perf_counter()
        quantize_dynamic(str(path), str(Path(tmp) / "q.onnx"), weight_type=QuantType.QInt8)
        qd_s = time.perf_counter() - t0
    return {"params": params, "seconds": toco_s, "per_1m_s": toco_s / (params / 1e6),
            "quantize_dynamic_per_1m_s": qd_s / (params / 1e6), "plan": report.plan.model_dump(mode="json"),
            "attempts": report.attempts}


# ---- 4: transfer --------------------------------------------------------------------------------
def raw_transfer(port: int, blob: Path, size: int) -> float:
    """Seconds from mosquitto_pub -f start until mosquitto_sub has received all ``size`` bytes."""
    topic = f"bench/raw/{time.monotonic_ns()}"
    sub = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-h", "127.0.0.1", "-t", topic, "-C", "1", "-q", "1",
                            "-N"], stdout=subprocess.PIPE)
    time.sleep(0.3)  # let the subscription settle (not timed)
    t0 = time.perf_counter()
    subprocess.run(["mosquitto_pub", "-p", str(port), "-h", "127.0.0.1", "-t", topic, "-q", "1", "-f", str(blob)],
                   check=True)
    got = sub.stdout.read() if sub.stdout else b""
    dt = time.perf_counter() - t0
    sub.wait(10)
    if len(got) != size:
        raise RuntimeError(f"mosquitto_sub got {len(got)} of {size} bytes")
    return dt


def toco_transfer(broker: Broker, key, manifest, data, work: Path) -> float:
    """Seconds for BundleDownloader to fetch and verify the bundle (publisher already serving)."""
    import queue

    from agent.bundle_download import BundleDownloader
    from agent.mqtt_link import MqttLink

    done: queue.Queue = queue.Queue()
    work.mkdir(parents=True, exist_ok=True)
    link = MqttLink(url=broker.url, fleet=FLEET, device_id=f"bench-dl-{time.monotonic_ns() % 10**9}",
                    state_dir=work, agent_version="bench")
    dl = BundleDownloader(link, work, key.public_key(), lambda m, d: done.put(len(d)),
                          lambda b, r, d: done.put(f"{r.value}: {d}"))
    link.start()
    try:
        if not link.wait_connected(10):
            raise RuntimeError("the downloader could not connect")
        t0 = time.perf_counter()
        dl.download(manifest.bundle_id, "bench")
        got = done.get(timeout=120)
        dt = time.perf_counter() - t0
    finally:
        dl.close()
        link.stop()
    if got != len(data):
        raise RuntimeError(f"download failed: {got}")
    return dt


def transfer(broker: Broker, key, work: Path, reps: int = 3) -> dict:
    """Median seconds and MB/s: 20 MB bundle via BundleDownloader vs mosquitto_pub/sub of the same bytes."""
    work.mkdir(parents=True, exist_ok=True)
    data = pack_bundle({"model.onnx": np.random.default_rng(0).bytes(20 * MB)})
    manifest = make_manifest(data, 256 * 1024, private_key=key)
    blob = work / "bundle.bin"
    blob.write_bytes(data)
    publisher = Publisher(broker.url, [(manifest, data)])
    try:
        toco = [toco_transfer(broker, key, manifest, data, work / f"dl{i}") for i in range(reps)]
    finally:
        publisher.close()
    raw = [raw_transfer(broker.port, blob, len(data)) for _ in range(reps)]
    t, r = statistics.median(toco), statistics.median(raw)
    return {"bytes": len(data), "toco_s": t, "raw_s": r, "toco_mb_s": len(data) / t / MB,
            "raw_mb_s": len(data) / r / MB,
            "ratio": r / t, "toco_all_s": toco, "raw_all_s": raw}


# ---- 5: signed commands --------------------------------------------------------------------------
def command_cost(n: int = 10) -> dict:
    """bench/_command_cost.py in a fresh process: the child-task check vs cryptography in the daemon."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "_command_cost.py"), str(n)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"bench/_command_cost.py failed: {out.stderr[-600:]}")
    return json.loads(out.stdout)


# ---- report -------------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("[green]yes[/green]" if ok else "[red]NO[/red]")


def table(res: dict) -> Table:
    t = Table(title="toco-agent benchmark (2 cores, loopback mosquitto)")
    for col in ("metric", "agent", "baseline (same run)", "target", "met"):
        t.add_column(col)
    a = res.get("agent")
    if a:
        i, b = a["idle"], a["bare_idle"]
        t.add_row("idle RSS, process tree (max / mean)", f"{i['rss_max_mb']:.1f} / {i['rss_mean_mb']:.1f} MB",
                  f"{b['rss_max_mb']:.1f} MB python+onnxruntime+model", "< 80 MB",
                  verdict(i["rss_max_mb"] < TARGETS["idle_rss_mb"]))
        if "libs_idle" in a:
            floor = a["libs_idle"]["rss_max_mb"]
            t.add_row("  of which the agent's own (idle RSS - floor)", f"{i['rss_max_mb'] - floor:.1f} MB",
                      f"{floor:.1f} MB floor: + pydantic, paho-mqtt, psutil", "", "")
        t.add_row("RSS right after the API traffic (shadow loaded)", f"{a['serving']['rss_max_mb']:.1f} MB", "", "", "")
        t.add_row(f"idle CPU over {i['seconds']:.0f} s", f"{i['cpu_pct']:.2f} %", f"{b['cpu_pct']:.2f} %", "< 1 %",
                  verdict(i["cpu_pct"] < TARGETS["idle_cpu_pct"]))
        over50, over99 = a["api"]["p50_ms"] - a["bare"]["p50_ms"], a["api"]["p99_ms"] - a["bare"]["p99_ms"]
        t.add_row("API /v1/infer batch 1, p50 / p99", f"{a['api']['p50_ms']:.3f} / {a['api']['p99_ms']:.3f} ms",
                  f"{a['bare']['p50_ms']:.3f} / {a['bare']['p99_ms']:.3f} ms bare onnxruntime", "", "")
        t.add_row("API overhead p50 / p99", f"{over50:.3f} / {over99:.3f} ms", "", "< 1 ms p50",
                  verdict(over50 < TARGETS["api_overhead_p50_ms"]))
        t.add_row("deploy: command -> active", f"{a['deploy_s']:.1f} s", "", "", "")
    else:
        t.add_row("idle RSS / CPU, API overhead", "not measured", res.get("agent_error", "skipped"), "", "")
    r = res.get("recompress")
    if r:
        t.add_row(f"recompression per 1M params (MLP, {r['params'] / 1e6:.2f} M)", f"{r['per_1m_s']:.1f} s",
                  f"{r['quantize_dynamic_per_1m_s']:.2f} s ort quantize_dynamic", "", "")
    c = res.get("commands")
    if c:
        t.add_row("signed command check, child task: p50 / daemon RSS",
                  f"{c['child']['p50_ms']:.0f} ms / +{c['child']['daemon_rss_delta_mb']:.1f} MB",
                  f"{c['in_daemon']['p50_ms']:.1f} ms / +{c['in_daemon']['daemon_rss_delta_mb']:.1f} MB "
                  "cryptography in the daemon", "", "")
    x = res.get("transfer")
    if x:
        t.add_row(f"transfer {x['bytes'] / MB:.0f} MB bundle", f"{x['toco_s']:.2f} s = {x['toco_mb_s']:.1f} MB/s",
                  f"{x['raw_s']:.2f} s = {x['raw_mb_s']:.1f} MB/s mosquitto_pub", "", "")
        t.add_row("transfer vs raw broker throughput", f"{100 * x['ratio']:.0f} %", "", ">= 50 %",
                  verdict(x["ratio"] >= TARGETS["transfer_ratio"]))
    return t


def main() -> None:
    """Run the four measurements, print the table, write bench/results/agent.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--skip-agent", action="store_true", help="only recompression and transfer")
    ap.add_argument("--commands-only", action="store_true", help="only the signed command check (5)")
    args = ap.parse_args()
    if args.commands_only:
        res: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commands": command_cost()}
        console.print(table(res))
        return
    if not os.path.exists(MOSQUITTO):
        sys.exit(f"{MOSQUITTO} is missing: apt-get install mosquitto mosquitto-clients")
    RESULTS.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    res = {"command": " ".join([Path(sys.executable).name, *sys.argv])}
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    broker = Broker()
    broker.start()
    try:
        with console.status("building the LeNet-5 bundle (cached analysis)"):
            manifest, data, cached, digits = demo_bundle(key)
        res["bundle"] = {"bytes": len(data), "analysis_cached": cached}
        if not args.skip_agent:
            with console.status(f"deploying to toco-agent run, then idle {args.idle_seconds:.0f} s and the API"):
                try:
                    res["agent"] = agent_run(broker, key, manifest, data, digits, args.idle_seconds, args.requests,
                                             work / "agent")
                except (RuntimeError, OSError, KeyError) as exc:
                    res["agent_error"] = str(exc)[-600:]
                    console.print(f"[red]agent measurement failed:[/red] {exc}")
        with console.status("recompressing the demo MLP"):
            res["recompress"] = recompression(digits)
        with console.status("20 MB transfers"):
            res["transfer"] = transfer(broker, key, work / "transfer")
        with console.status("signed command checks"):
            res["commands"] = command_cost()
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    console.print(table(res))
    (RESULTS / "agent.json").write_text(json.dumps(res, indent=2, default=str))
    console.print(f"written to {RESULTS / 'agent.json'}")


if __name__ == "__main__":
    main()
