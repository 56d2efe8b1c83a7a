"""Soak bench of the edge agent: does it stay flat under steady traffic for an hour?

    .venv/bin/python bench/soak.py [--minutes 60] [--rate 50] [--sample-seconds 60] [--warmup-minutes 5]

A real ``toco-agent run`` on a local mosquitto activates the signed LeNet-5 demo bundle (the
rig of bench/agent.py), then serves ``--rate`` POST /v1/infer requests per second (batch 1,
.npy bodies of held-out digits, two keep-alive client threads) for ``--minutes``, with drift
windows of 256 inputs (one closes every ~5 s at 50/s, a shadow run on a tenth of them) and
telemetry every 10 s. Every ``--sample-seconds`` the agent's process tree is sampled with psutil:
RSS, open file descriptors, threads, the outbox depth and the last closed drift window (from its
status.json), requests served and failed, from the start; the ``--minutes`` measured begin after
``--warmup-minutes`` of the same load. Goal: RSS growth < 2 MB from the first sample after the
warm-up to the last, no growth of descriptors or threads. The same-run baseline is that sample
itself: every row is a difference against it.

Prints the table and writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._agent_rig import DEVICE, FLEET, MB, Publisher, StatusWatch, demo_bundle  # noqa: E402
from bench._common import RESULTS  # noqa: E402
from tests.support.broker import Broker  # noqa: E402  (the tests' mosquitto)
from tests.support.processes import free_port, stop_process  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402
from toco_core.bundle import generate_private_key, save_public_key  # noqa: E402
from toco_core.topics import Topics  # noqa: E402

console = Console(width=150)
GOAL_RSS_MB = 2.0


class Load:
    """Two client threads sharing ``rate`` requests per second on keep-alive connections."""

    def __init__(self, port: int, samples: np.ndarray, rate: float) -> None:
        self.port, self.rate = port, rate
        self.bodies = []
        for x in samples:
            buf = io.BytesIO()
            np.save(buf, x[None].astype(np.float32))
            self.bodies.append(buf.getvalue())
        self.ok = self.failed = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(2)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        period, i = 2.0 / self.rate, k
        due = time.monotonic()
        while not self.stop.is_set():
            body = self.bodies[i % len(self.bodies)]
            i += 2
            try:
                conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": "application/x-npy"})
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    self.ok += 1
                else:
                    self.failed += 1
            except (OSError, http.client.HTTPException):
                self.failed += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            # a stalled agent is not sent a burst afterwards: missed slots are skipped, so the load
            # stays --rate (a run whose box was overloaded for a minute once caught up with 1,900
            # extra requests, and its RSS high-water rose 2.6 MB with them)
            due = max(due + period, time.monotonic())
            time.sleep(max(0.0, due - time.monotonic()))
        conn.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


def sample(proc: psutil.Process, state: Path, load: Load, t0: float) -> dict:
    """One row: the agent tree's RSS, descriptors and threads, outbox rows, drift windows, requests."""
    rss = fds = threads = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
            threads += p.num_threads()
        except psutil.NoSuchProcess:
            pass
    # the daemon rewrites status.json on every telemetry tick: its outbox depth and last drift window
    status = json.loads((state / "status.json").read_text()) if (state / "status.json").exists() else {}
    outbox, windows = status.get("outbox"), (status.get("last_drift") or {}).get("window")
    return {"minute": (time.monotonic() - t0) / 60, "rss_mb": rss / MB, "fds": fds, "threads": threads,
            "outbox": outbox, "windows": windows, "served": load.ok, "failed": load.failed}


def run(minutes: float, rate: float, every: float, warmup: float) -> dict:
    """Deploy, load, sample; returns the rows and the verdict."""
    key = generate_private_key()
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    broker = Broker()
    broker.start()
    agent = publisher = watch = load = None
    try:
        manifest, data, _, digits = demo_bundle(key)
        save_public_key(key, work / "fleet.pub")
        api_port, state = free_port(), work / "state"
        (work / "agent.toml").write_text("\n".join([
            f'device_id = "{DEVICE}"', f'fleet = "{FLEET}"', f'broker_url = "{broker.url}"', f'state_dir = "{state}"',
            f'public_key = "{work / "fleet.pub"}"', f"api_port = {api_port}", "telemetry_seconds = 10",
            "[drift]", "window_max_samples = 256", "window_seconds = 60"]) + "\n")
        exe = Path(sys.executable).with_name("toco-agent")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli"]
        log = open(work / "agent.log", "wb")  # noqa: SIM115 - the agent process writes it until it ends
        agent = subprocess.Popen([*cmd, "run", "--config", str(work / "agent.toml")], stdout=log,
                                 stderr=subprocess.STDOUT, cwd=work)
        publisher = Publisher(broker.url, [(manifest, data)])
        watch = StatusWatch(broker.port, Topics(FLEET))
        # a command sent before the agent's first connect would be lost (no session yet)
        connected = lambda: (state / "status.json").exists() and json.loads((state / "status.json").read_text()).get(  # noqa: E731
            "connected")
        if not wait_until(connected, 120, 0.2):
            raise RuntimeError("the agent did not connect to the broker:\n"
                               + (work / "agent.log").read_text(errors="replace")[-1500:])
        watch.deploy(manifest.bundle_id, key)
        if not wait_until(lambda: "active" in watch.phases(), 300, 0.2):
            tail = (work / "agent.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"the agent did not activate the bundle: phases {watch.phases()}\n{tail}")
        load = Load(api_port, digits.x_heldout[:500], rate)
        load.start()
        proc, t0, rows = psutil.Process(agent.pid), time.monotonic(), []
        time.sleep(min(every, 30.0))  # warm-up: sessions, shadow, first windows
        end = t0 + (warmup + minutes) * 60
        with console.status("soaking") as status:
            while True:
                rows.append(sample(proc, state, load, t0))
                status.update(f"soaking: minute {rows[-1]['minute']:.1f} of {warmup + minutes:g}, "
                              f"RSS {rows[-1]['rss_mb']:.1f} MB")
                if time.monotonic() >= end or agent.poll() is not None:
                    break
                time.sleep(min(every, max(0.0, end - time.monotonic())))
        return {"rows": rows, "exited": agent.poll(), "warmup_minutes": warmup, **verdict(rows, warmup)}
    finally:
        for part in (load, watch, publisher):
            if part is not None:
                part.close()
        stop_process(agent, 30)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def verdict(rows: list[dict], warmup: float) -> dict:
    """Growth from the first row after the warm-up to the last (and the largest RSS over that first row).

    The first minutes are warm-up, not growth: measured at 50 requests/s, RSS rose 1.6 MB in the
    first 4 minutes (drift windows, the shadow session, onnxruntime's arena at its working size),
    then 1.1 MB over the next 55.
    """
    measured = [r for r in rows if r["minute"] >= warmup] or rows[-1:]
    first, last = measured[0], rows[-1]
    return {"rss_growth_mb": last["rss_mb"] - first["rss_mb"],
            "rss_peak_growth_mb": max(r["rss_mb"] for r in rows) - first["rss_mb"],
            "fd_growth": last["fds"] - first["fds"], "thread_growth": last["threads"] - first["threads"]}


def print_table(res: dict, rate: float) -> None:
    """The samples as a table, then the verdict against the goals."""
    t = Table(title=f"agent soak: {rate:g} requests/s, drift windows and telemetry (differences against the first "
                    f"row after {res['warmup_minutes']:g} minutes of warm-up; earlier rows marked w)")
    for col in ("minute", "RSS MB", "Δ RSS MB", "fds", "threads", "outbox", "last window", "served", "failed"):
        t.add_column(col, justify="right")
    first = next((r for r in res["rows"] if r["minute"] >= res["warmup_minutes"]), res["rows"][-1])
    for r in res["rows"]:
        warm = " w" if r["minute"] < res["warmup_minutes"] else ""
        t.add_row(f"{r['minute']:.1f}{warm}", f"{r['rss_mb']:.1f}", f"{r['rss_mb'] - first['rss_mb']:+.2f}",
                  str(r["fds"]), str(r["threads"]), str(r["outbox"]), str(r["windows"]), f"{r['served']:,}",
                  str(r["failed"]))
    console.print(t)
    ok = res["rss_growth_mb"] < GOAL_RSS_MB and res["fd_growth"] <= 0 and res["thread_growth"] <= 0
    console.print(f"RSS growth {res['rss_growth_mb']:+.2f} MB (peak {res['rss_peak_growth_mb']:+.2f}; goal < "
                  f"{GOAL_RSS_MB} MB), descriptors {res['fd_growth']:+d}, threads {res['thread_growth']:+d} (goal: no "
                  f"growth): {'met' if ok else 'NOT met'}")


def main() -> None:
    """Run the soak, print the table, write bench/results/soak.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=50.0, help="requests per second")
    ap.add_argument("--sample-seconds", type=float, default=60.0)
    ap.add_argument("--warmup-minutes", type=float, default=5.0, help="load before the first measured sample")
    args = ap.parse_args()
    res = run(args.minutes, args.rate, args.sample_seconds, args.warmup_minutes)
    print_table(res, args.rate)
    RESULTS.mkdir(parents=True, exist_ok=True)
    res["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    (RESULTS / "soak.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
