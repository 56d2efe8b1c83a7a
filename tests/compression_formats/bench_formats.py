"""Measure session RSS and p50 latency of fp32 vs QDQ int8 vs MatMulNBits on this machine.

Not a test (pytest does not collect it): run ``.venv/bin/python tests/compression_formats/bench_formats.py``.
Each variant runs in its own fresh process so its RSS is its own: RSS after importing
onnxruntime, after creating the session, and after the timed runs (arena included).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from toco_core.compression.matmul_nbits import quantize_matmul_nbits
from toco_core.compression.qdq_int8 import quantize_qdq_int8
from toco_core.demo.data import mnist_splits
from toco_core.demo.train import demo_model
from toco_core.onnx_model import compressible_weights, load_model

_CHILD = r"""
import json, sys, time, numpy as np, psutil, onnxruntime as ort
path, shape, threads, runs = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
proc = psutil.Process()
rss0 = proc.memory_info().rss
opts = ort.SessionOptions(); opts.intra_op_num_threads = threads; opts.log_severity_level = 3
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
rss1 = proc.memory_info().rss
x = np.random.default_rng(0).random(shape, dtype=np.float32)
name = sess.get_inputs()[0].name
for _ in range(10):
    sess.run(None, {name: x})
times = []
for _ in range(runs):
    t = time.perf_counter(); sess.run(None, {name: x}); times.append(time.perf_counter() - t)
rss2 = proc.memory_info().rss
print(json.dumps({"session_mb": (rss1 - rss0) / 2**20, "after_runs_mb": (rss2 - rss0) / 2**20,
                  "p50_ms": float(np.median(times) * 1e3)}))
"""


def matmul_model(k: int = 4096, n: int = 4096) -> onnx.ModelProto:
    """One MatMul y = x @ W with a random [k, n] weight, input [batch, k]."""
    w = np.random.default_rng(0).normal(0, 0.02, (k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def measure(model: onnx.ModelProto, shape: list[int], threads: int, runs: int, tmp: Path, tag: str) -> dict:
    """Run the child in a fresh interpreter; returns its JSON plus the file size."""
    path = tmp / f"{tag}.onnx"
    onnx.save(model, str(path))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(shape), str(threads), str(runs)],
                         capture_output=True, text=True, check=True)
    return {"file_mb": path.stat().st_size / 2**20, **json.loads(out.stdout)}


def variants(model: onnx.ModelProto, calib: np.ndarray) -> dict[str, onnx.ModelProto]:
    """fp32, QDQ int8 and MatMulNBits 4-bit (block 32; accuracy level 0 and 4) of one model."""
    out = {"fp32": model, "qdq_int8": quantize_qdq_int8(model, None, calib)}
    mm = [w.name for w in compressible_weights(model) if w.op_type in ("MatMul", "Gemm")]
    if mm:
        out["nbits4_b32"] = quantize_matmul_nbits(model, {name: (4, 32) for name in mm})
        out["nbits4_b32_acc4"] = quantize_matmul_nbits(model, {name: (4, 32) for name in mm}, accuracy_level=4)
    return out


def main() -> None:
    digits = mnist_splits()
    cases = [("matmul4096", matmul_model(), [1, 4096],
              np.random.default_rng(1).normal(0, 1, (32, 4096)).astype(np.float32), 200),
             ("lenet5", load_model(demo_model("lenet5")), [1, 1, 28, 28], digits.x_pool[:200], 2000)]
    with tempfile.TemporaryDirectory() as d:
        for case, model, shape, calib, runs in cases:
            for tag, variant in variants(model, calib).items():
                for threads in (1, 2):
                    r = measure(variant, shape, threads, runs, Path(d), f"{case}-{tag}")
                    print(f"{case:11s} {tag:16s} threads={threads} file {r['file_mb']:7.2f} MB  session "
                          f"{r['session_mb']:7.1f} MB  after runs {r['after_runs_mb']:7.1f} MB  "
                          f"p50 {r['p50_ms']:8.3f} ms", flush=True)


if __name__ == "__main__":
    main()
