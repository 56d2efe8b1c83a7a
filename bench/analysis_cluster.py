"""Wall time of one analysis of the demo LeNet-5: in this process (builtin map) vs on a Dask cluster of
``--workers`` `dask worker` processes (one thread each) on this machine, started here with the CLI.

    PYTHONPATH=. .venv/bin/python bench/analysis_cluster.py [--workers 2] [--pool 120] [--full]

The cluster time is what the server waits for: the task with the model and pool bytes, the analysis
on a worker (its calibration grid spread over all workers), the result files back; the fastest of
``--repeat`` runs of each is reported. ``--full`` uses the
default AnalysisSettings instead of the fleet tests' fast ones. Prints both times and whether the
combination grids are equal.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FAST = {"initial_samples": 16, "samples_per_round": 16, "max_rounds": 1, "max_heldout": 60, "prune_rounds": 1,
        "prune_round_samples": 16, "committee_members": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pool", type=int, default=120, help="pool samples (MNIST digits)")
    ap.add_argument("--full", action="store_true", help="default analysis settings, not the fast ones")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each; the fastest is reported (the first "
                    "one in a process pays lazy imports and first-session costs)")
    args = ap.parse_args()

    from distributed import Client

    from fleet_server.analysis_cluster import run_cluster_analysis
    from tests.support.processes import free_port, stop_process
    from toco_core.analysis.pipeline import analyze
    from toco_core.analysis.settings import AnalysisSettings
    from toco_core.demo.data import mnist_splits
    from toco_core.demo.train import demo_model
    from toco_core.onnx_model import load_model

    d = mnist_splits()
    x, y = d.x_pool[: args.pool], d.y_pool[: args.pool]
    settings = AnalysisSettings() if args.full else AnalysisSettings(**FAST)
    path = Path(demo_model("lenet5"))

    t_local = float("inf")
    for _ in range(args.repeat):
        t = time.perf_counter()
        local = analyze(load_model(path), x, y, settings, model_name="lenet5")
        t_local = min(t_local, time.perf_counter() - t)

    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    payload = {"analysis_id": "bench", "settings": settings.model_dump(), "model_name": "lenet5",
               "model": path.read_bytes(), "pool": buf.getvalue(), "field": None}
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dask = str(Path(sys.executable).with_name("dask"))
    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "cluster.log", "wb")  # noqa: SIM115 - the children write it
        procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)]
        procs += [subprocess.Popen([dask, "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1", "--no-dashboard"],
                                   env=env, stdout=log, stderr=subprocess.STDOUT) for _ in range(args.workers)]
        try:
            client = Client(f"tcp://127.0.0.1:{port}", timeout=30, set_as_default=False)
            client.wait_for_workers(args.workers, timeout=120)
            t_cluster = float("inf")
            for _ in range(args.repeat):
                t = time.perf_counter()
                out = client.submit(run_cluster_analysis, payload, pure=False).result()
                t_cluster = min(t_cluster, time.perf_counter() - t)
            client.close()
        finally:
            for p in reversed(procs):
                stop_process(p)
            log.close()
    remote = json.loads(out["files"]["calibration.json"])["prune+quantize"]
    same = remote == local.curves["prune+quantize"].model_dump(mode="json")
    print(f"LeNet-5, pool {args.pool}, {'default' if args.full else 'fast'} settings, {os.cpu_count()} cores")
    print(f"local (one process, builtin map): {t_local:6.1f} s  "
          f"calibrate {local.manifest.timings['calibrate']:.1f} s (last run)")
    print(f"cluster ({args.workers} workers):          {t_cluster:6.1f} s  calibrate "
          f"{out['summary']['timings']['calibrate']:.1f} s (last run)")
    print(f"combination grid equal: {same}")


if __name__ == "__main__":
    main()
