"""onnxruntime sessions and batched inference (numpy in, numpy out).

onnx is imported only when a ModelProto is handed in: the edge daemon serves model bytes
and must not keep onnx (about 6 MB resident) loaded for months.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from toco_core.errors import ModelError
from toco_core.model_inputs import Batch, feed

if TYPE_CHECKING:
    import onnx


# onnxruntime's type names of the numeric tensor inputs a served model may take
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
              "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
              "tensor(bool)": np.bool_}


def input_dtype(node: ort.NodeArg) -> np.dtype:
    """The numpy dtype a session input takes (``session.get_inputs()[i]``).

    Raises ModelError for a type that is not a numeric tensor (strings, sequences, maps).
    """
    dtype = ORT_DTYPES.get(node.type)
    if dtype is None:
        raise ModelError(f"model input {node.name!r} has type {node.type}", "serve models with numeric tensor inputs")
    return np.dtype(dtype)


def make_session(model: onnx.ModelProto | bytes, threads: int = 0) -> ort.InferenceSession:
    """Create a CPU session; ``threads`` = 0 lets onnxruntime choose.

    Raises ModelError when onnxruntime cannot load the model.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if isinstance(model, bytes):
        data = model
    else:
        from toco_core.onnx_model import model_bytes

        data = model_bytes(model)
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {exc}", "check the model's opset and ops") from exc


def run_batches(session: ort.InferenceSession, x: Batch, batch_size: int = 256) -> np.ndarray:
    """Run the first output over ``x`` in batches; returns the concatenated output.

    ``x`` is an array for the first input or a ModelInputs for every input. Raises PoolError
    when a ModelInputs does not name the session's inputs.
    """
    names = [i.name for i in session.get_inputs()]
    outs = [session.run(None, feed(x[i : i + batch_size], names))[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


def run_model(model: onnx.ModelProto | bytes, x: Batch, batch_size: int = 256) -> np.ndarray:
    """One-shot convenience: session + batched run of the first output."""
    return run_batches(make_session(model), x, batch_size)


def session_with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> ort.InferenceSession:
    """A session of ``model`` with some initializers replaced, without copying the model.

    The new values are handed to onnxruntime as session initializers (SessionOptions.add_initializer),
    which is what makes committees and calibration sweeps on multi-MB models cheap. Weights held
    in Constant nodes fall back to a patched copy (toco_core.onnx_model.with_weights).
    """
    from toco_core.onnx_model import with_weights

    inits = {t.name for t in model.graph.initializer}
    if not set(weights) <= inits:
        return make_session(with_weights(model, weights))
    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # Measured with onnxruntime 1.32: at ORT_ENABLE_ALL the NCHWc Conv rewrite reads the model's own
    # initializer and silently ignores the override; EXTENDED honours it.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    # OrtValues borrow the numpy buffers: both must outlive the session (the session keeps them)
    arrays = [np.ascontiguousarray(v, dtype=np.float32) for v in weights.values()]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    for name, value in zip(weights, values):
        opts.add_initializer(name, value)
    try:
        sess = ort.InferenceSession(_cached_bytes(model), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {exc}", "check the model's opset and ops") from exc
    sess._toco_keepalive = (arrays, values)
    return sess


def run_with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray], x: Batch,
                     batch_size: int = 256) -> np.ndarray:
    """Run ``model``'s first output over ``x`` with some initializers replaced (no model copy).

    Raises ModelError when onnxruntime cannot load the model.
    """
    return run_batches(session_with_weights(model, weights), x, batch_size)


_BYTES_CACHE: dict[int, tuple[onnx.ModelProto, bytes]] = {}
# two models: a calibration sweep alternates between the model and its copy with the layer
# outputs bias correction reads
_BYTES_CACHE_SIZE = 2


def _cached_bytes(model: onnx.ModelProto) -> bytes:
    # Serializing a multi-MB model for every committee member costs more than the run itself.
    from toco_core.onnx_model import model_bytes

    hit = _BYTES_CACHE.pop(id(model), None)
    if hit is None or hit[0] is not model:
        hit = (model, model_bytes(model))
    _BYTES_CACHE[id(model)] = hit  # most recently used last
    while len(_BYTES_CACHE) > _BYTES_CACHE_SIZE:
        del _BYTES_CACHE[next(iter(_BYTES_CACHE))]
    return hit[1]
