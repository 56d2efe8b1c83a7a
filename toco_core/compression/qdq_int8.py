"""Full int8 QDQ quantization (weights and activations) with onnxruntime's ``quantize_static``.

onnxruntime fuses DequantizeLinear -> Conv/Gemm/MatMul -> QuantizeLinear into QLinearConv,
QGemm or an integer MatMul at session start, so the weights stay int8 in RAM and the layer
runs in integer arithmetic. Weight-only DequantizeLinear does not do that (design section 3):
this module always quantizes activations too, with ranges calibrated on real samples.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from toco_core.errors import ModelError, PoolError
from toco_core.model_inputs import Batch, ModelInputs, feed
from toco_core.onnx_model import input_spec
from toco_core.runtime import BATCH_BYTES, rows_per_batch

QUANTIZABLE = ("Conv", "Gemm", "MatMul")
# Ops that onnxruntime runs on uint8 data with their input's scale (NhwcMaxPool, a Relu folded into
# the QLinearConv before it, data movement). Left in float between two int8 layers, each costs a
# DequantizeLinear + QuantizeLinear pair per run: on the 224x224 grey CNN (toco_core.demo.large) the
# QDQ model with its pools in float ran at 0.68-0.73 ms, with them in int8 0.59-0.60 ms (base fp32
# 0.97-1.00 ms; 1 thread). Ops that change the values (HardSwish, Sigmoid, Mul, AveragePool) are not
# listed: they stay float islands unless they are targets themselves.
PASS_THROUGH = ("MaxPool", "Relu", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
_QMAX = 127  # symmetric int8 weights use [-127, 127] so that zero point 0 is exact


def int8_weight_error(w: np.ndarray, out_axis: int, per_channel: bool = True) -> np.ndarray:
    """Per-weight error |w - dequant(quant(w))| of symmetric int8 as ``quantize_static`` does it.

    s = max|w| / 127 over each output channel (``out_axis``; whole tensor when not per
    channel), stored as float32; q = clip(round_half_even(w / s), -127, 127); error = |w - q s|.
    A channel of zeros gets s = 1 (error 0). Returns float32 of w's shape.
    Raises ValueError when ``out_axis`` is not an axis of ``w``.
    """
    w = np.asarray(w, dtype=np.float32)
    if not -w.ndim <= out_axis < w.ndim:
        raise ValueError(f"out_axis {out_axis} is not an axis of a weight of shape {w.shape}")
    if per_channel:
        other = tuple(i for i in range(w.ndim) if i != out_axis % w.ndim)
        absmax = np.abs(w).max(axis=other, keepdims=True) if other else np.abs(w)
    else:
        absmax = np.abs(w).max(keepdims=True)
    scale = (2.0 * absmax.astype(np.float64) / (2 * _QMAX)).astype(np.float32)
    scale = np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale)
    q = np.clip(np.round(w / scale), -_QMAX, _QMAX)
    result: np.ndarray = np.abs(w - (q * scale).astype(np.float32))
    return result


class _Samples(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no types
    """Feeds the calibration samples to onnxruntime's calibrator in batches, one made at a time.

    The calibrator runs a copy of the model that reduces every activation to its min and max,
    so every activation of a batch is alive at once, as in bias correction: batches hold about
    a quarter of run_batches' input bytes (64 rows of 28x28 digits, 6 of RGB 224x224). Measured
    on the RGB MobileNet-style model: 64-row batches took the whole analysis from 1.5 to 3.4 GB
    for the two seconds of this calibration. The ranges are min/max over all samples, whatever
    the batching.
    """

    def __init__(self, names: list[str], x: Batch, batch: int | None = None) -> None:
        step = batch or rows_per_batch(x, limit=64, batch_bytes=BATCH_BYTES // 4)
        self._batches: Iterator[dict[str, np.ndarray]] = (feed(x[i : i + step], names)
                                                          for i in range(0, len(x), step))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes whose weight is a constant (the default target set)."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n.name for n in model.graph.node if n.op_type in QUANTIZABLE and len(n.input) > 1 and n.input[1] in consts]


def quantize_qdq_int8(model: onnx.ModelProto, nodes: Sequence[str] | None, calibration_x: Batch,
                      per_channel: bool = True) -> onnx.ModelProto:
    """Quantize the named nodes to int8 QDQ: weights (symmetric, per channel by default) and activations.

    Takes the model, the node names to quantize (None = every Conv/Gemm/MatMul with a constant
    weight; the PASS_THROUGH ops between two of them are quantized too, int8_chain_ops) and
    calibration inputs: an array for the first graph input or a ModelInputs for every input
    (activation ranges = MinMax over them). Activations are unsigned int8 (asymmetric), weights
    signed int8 (symmetric), the pairing onnxruntime recommends for x86 CPUs. Returns the QDQ
    model; onnxruntime fuses it into QLinearConv / QGemm / integer MatMul when the session starts.
    Raises ModelError for an unknown node name or when onnxruntime cannot quantize the model,
    PoolError when the calibration samples are empty or shaped wrong.
    """
    named = _with_node_names(model)
    known = set(quantizable_nodes(named))
    targets = sorted(known) if nodes is None else list(nodes)
    unknown = [n for n in targets if n not in known]
    if unknown:
        raise ModelError(f"nodes {unknown} are not Conv/Gemm/MatMul nodes with a constant weight",
                         f"choose among {sorted(known)}")
    spec = input_spec(named)
    names = [i.name for i in named.graph.input if i.name not in {t.name for t in named.graph.initializer}]
    if isinstance(calibration_x, ModelInputs):  # a pool of several inputs was fitted to them when loaded
        x: Batch = calibration_x
        if len(x) == 0:
            raise PoolError("no calibration samples", "pass a non-empty batch of the model inputs")
    else:
        x = np.asarray(calibration_x, dtype=spec.dtype)
        if len(x) == 0 or x.ndim != len(spec.shape) or any(
                d and d != s for d, s in zip(spec.shape[1:], x.shape[1:], strict=True)):
            raise PoolError(f"calibration samples of shape {x.shape} do not fit input {spec.name!r} {spec.shape}",
                            "pass a non-empty batch shaped like the model input")
    if not targets:
        return named
    targets += int8_chain_ops(named, targets)
    with tempfile.TemporaryDirectory(prefix="toco-qdq-") as tmp:
        out = Path(tmp) / "qdq.onnx"
        try:
            with _quiet_root_warnings():
                quantize_static(named, str(out), _Samples(names, x), quant_format=QuantFormat.QDQ,
                                per_channel=per_channel, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, nodes_to_quantize=targets,
                                calibrate_method=CalibrationMethod.MinMax,
                                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        except Exception as exc:  # onnxruntime raises plain exceptions of many kinds here
            raise ModelError(f"onnxruntime could not quantize the model: {exc}", "check the model's ops") from exc
        return onnx.load(str(out))


@contextlib.contextmanager
def _quiet_root_warnings() -> Iterator[None]:
    """Drop warnings logged on the root logger while onnxruntime quantizes.

    onnxruntime's quantizer calls ``logging.warning`` ("consider pre-processing") on every run;
    on a logger-less process that would also install a stderr handler on the root logger.
    """
    root = logging.getLogger()
    guard = logging.NullHandler()
    drop_warnings = lambda record: record.levelno > logging.WARNING  # noqa: E731
    root.addHandler(guard)
    root.addFilter(drop_warnings)
    try:
        yield
    finally:
        root.removeFilter(drop_warnings)
        root.removeHandler(guard)


def int8_fits(w: np.ndarray, tau: np.ndarray, out_axis: int, coverage: float = 0.99) -> bool:
    """True when per-channel int8 rounding keeps |error| <= tau for at least ``coverage`` of the weights.

    Exact zeros (pruned weights) stay exactly zero in int8 and are not counted.
    Raises ValueError for mismatched shapes or an out_axis outside w.
    """
    if w.shape != tau.shape:
        raise ValueError(f"weight shape {w.shape} != tolerance shape {tau.shape}")
    live = w != 0
    if not live.any():
        return True
    err = int8_weight_error(w, out_axis)
    return float((err[live] <= tau[live]).mean()) >= coverage


def int8_chain_ops(model: onnx.ModelProto, targets: Sequence[str]) -> list[str]:
    """The PASS_THROUGH nodes that sit between two of ``targets`` (node names), not themselves targets.

    A node qualifies when its data input comes, through PASS_THROUGH nodes only, from a target and
    its output reaches, the same way, a target: quantized, the chain stays in uint8 from one int8
    layer to the next. A pass-through op next to a float layer is left out (it would only move the
    DequantizeLinear). Returns names in graph order.
    """
    wanted = set(targets)
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def from_target(node: onnx.NodeProto) -> bool:
        src = producer.get(node.input[0]) if node.input else None
        while src is not None and src.name not in wanted and src.op_type in PASS_THROUGH:
            src = producer.get(src.input[0]) if src.input else None
        return src is not None and src.name in wanted

    def to_target(node: onnx.NodeProto) -> bool:
        todo, seen = list(node.output), set()
        while todo:
            for r in readers.get(todo.pop(), []):
                if r.name in wanted:
                    return True
                if r.op_type in PASS_THROUGH and r.name not in seen:
                    seen.add(r.name)
                    todo.extend(r.output)
        return False

    return [n.name for n in model.graph.node
            if n.op_type in PASS_THROUGH and n.name not in wanted and from_target(n) and to_target(n)]


def nodes_of_weights(model: onnx.ModelProto, weights: Sequence[str]) -> list[str]:
    """Names (as ``with_node_names`` gives them) of the Conv/Gemm/MatMul nodes whose weight input is listed."""
    named = with_node_names(model)
    wanted = set(weights)
    targets = set(quantizable_nodes(named))
    return [n.name for n in named.graph.node if n.name in targets and n.input[1] in wanted]


def with_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose every node has a unique name (deterministic: ``{op}_{index}`` for the unnamed)."""
    return _with_node_names(model)


def _with_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose every node has a unique name (quantize_static addresses nodes by name)."""
    new = copy.deepcopy(model)
    seen: set[str] = set()
    taken = {n.name for n in new.graph.node}
    for i, node in enumerate(new.graph.node):
        if not node.name or node.name in seen:
            name, j = f"{node.op_type}_{i}", 0
            while name in taken:
                j += 1
                name = f"{node.op_type}_{i}_{j}"
            node.name = name
            taken.add(name)
        seen.add(node.name)
    return new


def without_zero_bias_points(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the all-zero int32 zero points of ``quantize_static``'s bias DequantizeLinear nodes
    (and their initializers once unused): the same outputs, since ONNX defaults a missing zero point to 0.

    onnxruntime still fuses the layers into QGemm / QLinearConv without them (checked on the MLP, LeNet-5
    and the 224x224 model, tests/compression_formats/test_qdq_int8.py); the int8 weights' zero points
    stay, without them it does not. 4 bytes a bias channel: 1.6 KB of the MLP's int8 file, 3.5 KB of
    the 224x224 model's.
    """
    new = copy.deepcopy(model)
    inits = {t.name: t for t in new.graph.initializer}

    def zero_int32(name: str) -> bool:
        tensor = inits.get(name)
        return tensor is not None and tensor.data_type == onnx.TensorProto.INT32 \
            and not onnx.numpy_helper.to_array(tensor).any()

    for node in new.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and zero_int32(node.input[2]) \
                and node.input[0] in inits and inits[node.input[0]].data_type == onnx.TensorProto.INT32:
            del node.input[2]
    used = {name for node in new.graph.node for name in node.input} | {o.name for o in new.graph.output}
    kept = [t for t in new.graph.initializer if t.name in used]
    del new.graph.initializer[:]
    new.graph.initializer.extend(kept)
    return new
