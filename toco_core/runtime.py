"""onnxruntime sessions and batched inference (numpy in, numpy out)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from toco_core.errors import ModelError
from toco_core.onnx_model import model_bytes


def make_session(model: onnx.ModelProto | bytes, threads: int = 0) -> ort.InferenceSession:
    """Create a CPU session; ``threads`` = 0 lets onnxruntime choose.

    Raises ModelError when onnxruntime cannot load the model.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data = model if isinstance(model, bytes) else model_bytes(model)
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {exc}", "check the model's opset and ops") from exc


def run_batches(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run the first output over ``x`` in batches; returns the concatenated output."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


def run_model(model: onnx.ModelProto | bytes, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """One-shot convenience: session + batched run of the first output."""
    return run_batches(make_session(model), x, batch_size)
