"""onnxruntime sessions and batched inference (numpy in, numpy out).

onnx is imported only when a ModelProto is handed in: the edge daemon serves model bytes
and must not keep onnx (about 6 MB resident) loaded for months.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


_LOCAL = threading.local()


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Inside the block, sessions this thread creates without an explicit thread count use
    ``threads`` intra-op threads (0: onnxruntime chooses, the default outside any block).

    For callers that run sessions side by side in threads: two sessions of onnxruntime's own
    choice (one thread per core each) spin against each other on the same cores.
    """
    before = getattr(_LOCAL, "threads", 0)
    _LOCAL.threads = threads
    try:
        yield
    finally:
        _LOCAL.threads = before


def _threads(threads: int | None) -> int:
    return int(getattr(_LOCAL, "threads", 0)) if threads is None else threads


def make_session(model: onnx.ModelProto | bytes, threads: int | None = None) -> ort.InferenceSession:
    """Create a CPU session; ``threads`` = 0 lets onnxruntime choose, None takes intra_op_threads'.

    Raises ModelError when onnxruntime cannot load the model.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _threads(threads)
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


MAX_BATCH_ROWS = 256
# Input bytes per onnxruntime run. Activations, and with them the session's memory arena (which
# keeps its high-water mark), grow with the batch: 256 RGB 224x224 images are 154 MB of input and
# ~300 MB per early MobileNet activation. 16 MiB keeps 28x28 digits at 256 rows and gives
# 224x224 images 27 (RGB) or 83 (grey) rows, at the same throughput.
BATCH_BYTES = 16 * 2**20


def rows_per_batch(x: Batch, limit: int = MAX_BATCH_ROWS, batch_bytes: int = BATCH_BYTES) -> int:
    """Rows of ``x`` per run so that a batch holds about ``batch_bytes`` of input (every input's
    bytes for a ModelInputs): clamp(batch_bytes // bytes per row, 1, limit)."""
    row = x[0].nbytes if len(x) else 1
    return int(max(1, min(limit, batch_bytes // max(row, 1))))


def run_batches(session: ort.InferenceSession, x: Batch, batch_size: int | None = None) -> np.ndarray:
    """Run the first output over ``x`` in batches (``batch_size`` rows, default rows_per_batch(x));
    returns the concatenated output.

    ``x`` is an array for the first input or a ModelInputs for every input. Raises PoolError
    when a ModelInputs does not name the session's inputs.
    """
    names = [i.name for i in session.get_inputs()]
    step = batch_size or rows_per_batch(x)
    outs = [session.run(None, feed(x[i : i + step], names))[0] for i in range(0, len(x), step)]
    return np.concatenate(outs, axis=0)


def run_model(model: onnx.ModelProto | bytes, x: Batch, batch_size: int | None = None) -> np.ndarray:
    """One-shot convenience: session + batched run of the first output (batches as run_batches)."""
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
    opts.intra_op_num_threads = _threads(None)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # Measured with onnxruntime 1.32: at ORT_ENABLE_ALL the NCHWc Conv rewrite reads the model's own
    # initializer and silently ignores the override; EXTENDED honours it.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    # OrtValues borrow the numpy buffers: both must outlive the session (the session keeps them)
    arrays = [np.ascontiguousarray(v, dtype=np.float32) for v in weights.values()]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    for name, value in zip(weights, values, strict=True):
        opts.add_initializer(name, value)
    try:
        sess = ort.InferenceSession(_cached_bytes(model), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {exc}", "check the model's opset and ops") from exc
    sess._toco_keepalive = (arrays, values)
    return sess


def run_with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray], x: Batch,
                     batch_size: int | None = None) -> np.ndarray:
    """Run ``model``'s first output over ``x`` with some initializers replaced (no model copy).

    Raises ModelError when onnxruntime cannot load the model.
    """
    return run_batches(session_with_weights(model, weights), x, batch_size)


_BYTES_CACHE: dict[int, tuple[onnx.ModelProto, bytes]] = {}
# two models: a calibration sweep alternates between the model and its copy with the layer
# outputs bias correction reads
_BYTES_CACHE_SIZE = 2
_BYTES_LOCK = threading.Lock()  # calibration measures points in threads (toco_core.analysis.side_by_side)


def _cached_bytes(model: onnx.ModelProto) -> bytes:
    # Serializing a multi-MB model for every committee member costs more than the run itself.
    from toco_core.onnx_model import model_bytes

    with _BYTES_LOCK:
        hit = _BYTES_CACHE.pop(id(model), None)
        if hit is None or hit[0] is not model:
            hit = (model, model_bytes(model))
        _BYTES_CACHE[id(model)] = hit  # most recently used last
        while len(_BYTES_CACHE) > _BYTES_CACHE_SIZE:
            del _BYTES_CACHE[next(iter(_BYTES_CACHE))]
        return hit[1]
