"""Bias correction: give back, through each layer's bias, the mean shift compression causes.

Pruning and rounding move a channel's pre-activation output by ``(W' - W) x``. Its mean over
real inputs is rarely zero (pruning removes the small weights of one sign more than the
other, coarse steps round whole channels one way), and a constant shift survives every ReLU
and max-pool after it. Measured on LeNet-5 (prune 50%, quant s=0.4, 12.1 KB): 1.1% of 1000
unseen digits flip without the correction, 0.8% with it.

Each layer also absorbs the shift the compressed layers before it pass on. In passes over
all biased layers at once:

    b_c <- b_c + mean_(n, p) Y_c(x) - mean_(n, p) Y'_c(x)

with Y the base model's output of the layer (channel c, sample n, position p) and Y' the
output of the compressed model with the biases of the previous pass. After pass k the first
k layers are exact (their inputs no longer move), which is the layer-by-layer sequential
correction at a fraction of its runs. The correction samples must not be the ones the
self-test measures on (the analysis samples, not the calibration samples): a gate on the
fitted samples would flatter.

Corrected biases are float16 values where that rounding is below the correction's own grid or a
sixteenth of the channel's weight step (apply_deltas), so the storage form holds them in 2 bytes
instead of 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from toco_core.model_inputs import Batch, feed
from toco_core.onnx_model import WeightInfo, with_outputs
from toco_core.runtime import BATCH_BYTES, rows_per_batch, session_with_weights

# op -> index of its bias input; their outputs are (N, C, ...), channels on axis 1
_BIASED_OPS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}
# Correction samples: up to 256 (the means settle long before), fewer for large models, where a
# calibration sweep pays the passes on every point: samples = clip(SAMPLE_WEIGHTS / weights).
# A function of the model alone, so the analysis and every device fit the same biases.
MAX_SAMPLES, MIN_SAMPLES, SAMPLE_WEIGHTS = 256, 32, 2.5e8
# Each pass makes one more layer exact and the rest converge; measured on LeNet-5 and the MLP,
# 1 pass over-corrects (later layers absorb shifts their inputs then lose), 3 match a layer-by-layer
# sequential correction (6 passes) within one flip in 500 digits.
PASSES = 3


@dataclass(frozen=True)
class BiasedLayer:
    """A compressible weight whose node adds a float bias initializer of one value per channel."""

    weight: str
    bias: str
    output: str


def biased_layers(model: onnx.ModelProto, infos: list[WeightInfo]) -> list[BiasedLayer]:
    """The layers bias correction can act on, in graph (topological) order.

    Conv/ConvTranspose/Gemm nodes whose weight is in ``infos`` and whose bias is a float
    initializer with one value per output channel (Gemm with a broadcast scalar bias, MatMul
    followed by Add, and Constant-node biases are left alone).
    """
    weights = {i.name: i for i in infos}
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        slot = _BIASED_OPS.get(node.op_type)
        if slot is None or len(node.input) <= slot or node.input[1] not in weights or not node.input[slot]:
            continue
        info, bias = weights[node.input[1]], inits.get(node.input[slot])
        if (bias is None or bias.data_type != onnx.TensorProto.FLOAT
                or tuple(bias.dims) != (info.shape[info.out_axis],)):
            continue
        out.append(BiasedLayer(info.name, bias.name, node.output[0]))
    return out


def _channel_sums(y: np.ndarray) -> np.ndarray:
    """Sum of an (N, C, ...) output over everything but the channel axis, in float64.

    Reduced in place over the other axes: moving the channels first made a copy of every layer
    output of every batch, a fifth of a LeNet-5 correction pass (measured 6.6 of 25 ms)."""
    result: np.ndarray = y.sum(axis=(0, *range(2, y.ndim)), dtype=np.float64)
    return result


def channel_means(model: onnx.ModelProto, weights: dict[str, np.ndarray], x: Batch,
                  names: list[str], batch_size: int = 64) -> list[np.ndarray]:
    """Per-channel means of the named (N, C, ...) tensors over ``x``, weights replaced.

    ``model`` must already have the names as graph outputs (toco_core.onnx_model.with_outputs).
    Batches are summed as they come, so a large model's activations are never all held.
    Raises ModelError when onnxruntime cannot run the model.
    """
    sess = session_with_weights(model, weights)
    inputs = [i.name for i in sess.get_inputs()]
    sums = [np.zeros(0)] * len(names)
    counts = [0] * len(names)
    # every layer's output of a batch is held at once: a quarter of run_batches' input bytes
    step = rows_per_batch(x, limit=batch_size, batch_bytes=BATCH_BYTES // 4)
    for i in range(0, len(x), step):
        for k, y in enumerate(sess.run(names, feed(x[i:i + step], inputs))):
            part = _channel_sums(y)
            sums[k] = part if counts[k] == 0 else sums[k] + part
            counts[k] += y.size // y.shape[1]
    return [total / max(n, 1) for total, n in zip(sums, counts, strict=True)]


def correction_samples(infos: list[WeightInfo]) -> int:
    """How many correction samples a model's bias correction uses: clip(2.5e8 / weights, 32, 256)."""
    weights = max(sum(i.size for i in infos), 1)
    return int(min(MAX_SAMPLES, max(MIN_SAMPLES, SAMPLE_WEIGHTS // weights)))


class BiasCorrection:
    """Bias correction of one model on fixed correction samples; the base means are measured once.

    A calibration sweep corrects ~100 compressed variants of the same model: the constructor runs
    the base once, ``biases`` then costs ``passes`` runs of the compressed model.
    """

    def __init__(self, model: onnx.ModelProto, infos: list[WeightInfo], x: Batch,
                 base_means: list[np.ndarray] | None = None) -> None:
        """Find the biased layers and measure the base model's channel means on the first
        correction_samples(infos) of ``x``, or take them as given (``base_means``, in layer order:
        a box without the fp32 base gets them in its bundle). Raises ModelError when onnxruntime
        cannot run the model, ValueError when given means do not fit the layers."""
        self.layers = biased_layers(model, infos)
        self.x = x[:correction_samples(infos)]
        self.outputs = [layer.output for layer in self.layers]
        # one copy exposing every layer output, made once
        self.model = with_outputs(model, self.outputs) if self.layers else model
        inits = {t.name: t for t in model.graph.initializer}
        self.base_bias = {layer.bias: onnx.numpy_helper.to_array(inits[layer.bias]).astype(np.float64)
                          for layer in self.layers}
        if base_means is not None:
            if [len(m) for m in base_means] != [len(b) for b in (self.base_bias[lay.bias] for lay in self.layers)]:
                raise ValueError("the given base channel means do not fit the model's biased layers")
            self.base_means = [np.asarray(m, dtype=np.float64) for m in base_means]
        else:
            self.base_means = channel_means(self.model, {}, self.x, self.outputs) if self.layers and len(self.x) else []

    def deltas(self, values: dict[str, np.ndarray], passes: int = PASSES) -> dict[str, np.ndarray]:
        """Bias deltas {name: float16} for the weights ``values`` (see module doc): the corrected
        bias minus the original, on the layer's power-of-two grid (on_delta_grid), the form they
        travel in (toco_core.bias_parts).

        Each pass runs the model with the biases so far and moves every layer's bias by its
        remaining mean shift; pass k makes layer k exact, later layers converge. Returns {} when
        no layer has a bias, no weight of such a layer is in ``values``, or there are no samples.
        """
        if not self.base_means or not any(layer.weight in values for layer in self.layers):
            return {}
        biases = {name: b.copy() for name, b in self.base_bias.items()}
        for _ in range(max(passes, 1)):
            current = {k: v.astype(np.float32) for k, v in biases.items()}
            now = channel_means(self.model, {**values, **current}, self.x, self.outputs)
            for layer, base, cur in zip(self.layers, self.base_means, now, strict=True):
                biases[layer.bias] += base - cur
        return {k: on_delta_grid(v - self.base_bias[k]) for k, v in biases.items()}

    def biases(self, values: dict[str, np.ndarray], passes: int = PASSES,
               steps: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Corrected biases {name: float32}: apply_deltas of ``deltas(values, passes)``; ``steps``:
        {weight name: per-channel steps} of the codes behind ``values``."""
        return self.with_deltas(self.deltas(values, passes), steps)

    def with_deltas(self, deltas: dict[str, np.ndarray],
                    steps: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The base biases moved by ``deltas`` (float16, as deltas() returns them), {name: float32};
        ``steps``: {weight name: per-channel steps} of the point's codes (apply_deltas)."""
        base = {k: v.astype(np.float32) for k, v in self.base_bias.items()}
        return apply_deltas(base, deltas, bias_steps(self.layers, steps or {}))

    def shifts(self, biases: dict[str, np.ndarray]) -> dict[str, float]:
        """For the report: weight name -> largest |corrected - original| of its layer's bias, for
        the layers whose bias is in ``biases``."""
        return {layer.weight: float(np.abs(biases[layer.bias] - self.base_bias[layer.bias]).max())
                for layer in self.layers if layer.bias in biases}


DELTA_CODE = 127  # a layer's deltas travel as int8 codes times a power of two (toco_core.bias_parts)
_MIN_EXPONENT = -24  # float16's smallest subnormal: every code times 2^e, e >= -24, is exact in float16


def delta_exponent(d: np.ndarray) -> int:
    """The grid exponent of one layer's deltas: the smallest e >= -24 with max|d| / 2^e <= 127."""
    top = float(np.abs(d).max(initial=0.0))
    if top == 0 or not np.isfinite(top):
        return _MIN_EXPONENT
    return max(_MIN_EXPONENT, int(np.ceil(np.log2(top / DELTA_CODE))))


def on_delta_grid(d: np.ndarray) -> np.ndarray:
    """One layer's deltas rounded to the grid they travel on: q * 2^e, q = rint(d / 2^e) in
    -127..127, e = delta_exponent(d). Returned as float16, which holds every such value exactly.

    The step is at most max|d| / 64: a rounding of under 1/128 of the layer's largest shift, far
    below the shift's own sampling noise (the mean over 32-256 correction samples), and it lets a
    point's deltas travel in 8 bits each instead of float16's 16 (toco_core.bias_parts).
    """
    e = delta_exponent(d)
    q = np.clip(np.rint(np.asarray(d, np.float64) / 2.0**e), -DELTA_CODE, DELTA_CODE) + 0.0  # no -0.0
    result: np.ndarray = (q * 2.0**e).astype(np.float16)
    return result


# A bias rounded to float16 within this share of its channel's weight step moves the channel's output
# by less than an eighth of what each of its weights may move by rounding (half a step), and a channel
# has 25-400 of those: BatchNorm-folded Conv biases (|b| ~ 1, shifts ~ 1e-3) round by 1-3% of a step
# at a 1% size plan, and cost 2 bytes a channel instead of 4 in the storage form.
HALF_WITHIN_STEP = 1 / 16


def half_within(values: np.ndarray, tolerance: np.ndarray | float) -> np.ndarray:
    """``values`` (float32) rounded to float16 and back where every value's rounding is within its
    ``tolerance`` (a scalar or one per value) and all stay finite; else ``values`` unchanged. All or
    nothing per tensor: the storage form holds a tensor in 2 bytes a value only when every value fits."""
    exact = np.asarray(values, np.float32)
    half = exact.astype(np.float16).astype(np.float32)
    fits = bool(np.isfinite(half).all()) and bool((np.abs(half - exact) <= tolerance).all())
    return half if fits else exact


def apply_deltas(base: dict[str, np.ndarray], deltas: dict[str, np.ndarray],
                 steps: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Corrected biases from the original float32 biases and float16 deltas, {name: float32}: the one
    formula the calibration, the server's build and a box's build from bias parts share, so all
    three run the same model.

    A layer's corrected bias b + d is rounded to float16 (half_within) where, channel by channel,
    that rounding is within the larger of max|d| / 256 (half the finest step on_delta_grid uses: the
    correction is only known that well) and step_c * HALF_WITHIN_STEP, with step_c the channel's
    weight step (``steps``: {bias name: one step per output channel}, the point's codes). In the
    storage form a float16 bias costs 2 bytes a channel instead of 4 (toco_core.compression.storage;
    LeNet-5's size plans: ~0.4 KB of 10-13 KB). Elsewhere the layer keeps float32(b + d).
    """
    given = steps or {}
    out = {}
    for k, d in deltas.items():
        d32 = np.asarray(d, np.float32)
        exact = np.asarray(base[k], np.float32) + d32
        tolerance = np.full(exact.shape, float(np.abs(d32).max(initial=0.0)) / 256)
        if k in given and np.shape(given[k]) == exact.shape:
            tolerance = np.maximum(tolerance, np.asarray(given[k], np.float64) * HALF_WITHIN_STEP)
        out[k] = half_within(exact, tolerance)
    return out


def bias_steps(layers: list[BiasedLayer], steps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{bias name: its layer's per-channel weight steps} from {weight name: steps} (apply_deltas)."""
    return {layer.bias: steps[layer.weight] for layer in layers if layer.weight in steps}


def bias_shifts(model: onnx.ModelProto, infos: list[WeightInfo], biases: dict[str, np.ndarray]) -> dict[str, float]:
    """BiasCorrection.shifts without fitting anything: weight name -> largest |corrected - original|
    of its layer's bias (original: ``model``'s initializer), for the layers whose bias is in ``biases``."""
    inits = {t.name: t for t in model.graph.initializer}
    return {layer.weight: float(np.abs(biases[layer.bias].astype(np.float64)
                                       - onnx.numpy_helper.to_array(inits[layer.bias]).astype(np.float64)).max())
            for layer in biased_layers(model, infos) if layer.bias in biases}
