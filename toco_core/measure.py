"""Measure a model on this box: p50 latency at batch 1 and session memory (in a child process).

Run as ``python -m toco_core.measure FILE`` it prints the RSS growth of creating a session
and running it once, in bytes: a clean process so nothing else is counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from toco_core.model_inputs import Batch, feed
from toco_core.runtime import input_dtype, make_session


def p50_latency(model: onnx.ModelProto | bytes, x1: Batch, threads: int = 0, runs: int = 100,
                max_seconds: float = 0.25) -> float:
    """Median seconds of one batch-1 run after warm-up: ``runs`` timed runs, fewer (at least 20)
    when they would take longer than ``max_seconds`` (a median of 20 is stable to a few %)."""
    sess = make_session(model, threads)
    feeds = feed(x1, [i.name for i in sess.get_inputs()])
    t = time.perf_counter()
    for _ in range(5):
        sess.run(None, feeds)
    per_run = (time.perf_counter() - t) / 5
    runs = max(20, min(runs, int(max_seconds / max(per_run, 1e-9))))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def session_rss(model_bytes: bytes, input_shape: tuple[int, ...] | dict[str, tuple[int, ...]]) -> int | None:
    """RSS growth (bytes) of loading and running the model once in a fresh process; None on failure.

    ``input_shape``: the first input's shape, or the shape per input name (toco_core.model_inputs.shapes).
    """
    shapes = input_shape if isinstance(input_shape, dict) else {"": input_shape}
    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
        f.write(model_bytes)
        f.flush()
        proc = subprocess.run([sys.executable, "-m", "toco_core.measure", f.name,
                               json.dumps({k: [int(d) for d in v] for k, v in shapes.items()})],
                              capture_output=True, text=True, timeout=120)
    try:
        return int(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _child(path: str, shapes: str) -> None:
    import psutil

    proc = psutil.Process()
    data = Path(path).read_bytes()
    before = proc.memory_info().rss
    sess = make_session(data, 1)
    wanted = json.loads(shapes)
    rng = np.random.default_rng(0)
    # every input in its own dtype: a uint8 camera model refuses float data (and the RSS would be lost)
    feeds = {inp.name: rng.integers(0, 2, wanted.get(inp.name, wanted.get("", []))).astype(input_dtype(inp))
             for inp in sess.get_inputs()}
    sess.run(None, feeds)
    print(proc.memory_info().rss - before)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
