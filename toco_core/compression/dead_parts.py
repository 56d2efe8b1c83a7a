"""A point's model without its dead parts, and the float16 rounding of the biases the removal folds into.

Compression leaves channels whose weights are all zero (pruning, or rounding alone: a unit the pool
never activates has an unbounded tolerance) and channels no reader uses. The build removes them
(toco_core.compression.structured); a removed channel's constant output is folded into its readers'
biases, which takes those biases off float16 (bias_correction.apply_deltas) and back to 4 bytes a
channel in the storage form. ``folded_biases_on_half`` puts them back on float16 where that moves no
kept channel by more than HALF_WITHIN_STEP of its weight step, and ``fold_rounding`` gives the
calibration that same rounding in the full model's channel space, so that the curves measure the
model a box builds.
"""

from __future__ import annotations

import numpy as np
import onnx

from toco_core.compression.bias_correction import HALF_WITHIN_STEP, BiasedLayer, half_within
from toco_core.compression.input_gather import gather_read_features
from toco_core.compression.structured import dead_channels, remove_output_channels
from toco_core.onnx_model import with_weights


def without_dead_parts(float_model: onnx.ModelProto, values: dict[str, np.ndarray],
                       ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model without its dead channels (structured.dead_channels) and with its dense layers reading
    only the features their weights use (input_gather); returns it and the output channels removed
    per weight (bool masks, {} when none). The model itself when nothing goes.

    ``values``: the compressed weights (a channel is dead when its weights there are all zero).
    Raises ModelError as structured.remove_output_channels does.
    """
    # rounding alone zeroes whole channels too (a unit the pool never activates has an unbounded
    # tolerance): removing them needs no pruning (MLP demo at quant s=0.19: 26 of 300 hidden units);
    # pruning also leaves channels whose readers' weights are all zero (LeNet-5 bn-s1 at prune 40%:
    # 21 of fc1's 120 units unread)
    drop = dead_channels(float_model, values)
    if not any(m.any() for m in drop.values()):
        drop = {}
    runnable = remove_output_channels(float_model, drop) if drop else float_model
    runnable, _ = gather_read_features(runnable)  # what no removal reaches: a layer reading the input
    return runnable, drop


def _rounded_biases(runnable: onnx.ModelProto, float_model: onnx.ModelProto, layers: list[BiasedLayer],
                    steps: dict[str, np.ndarray], dropped: dict[str, np.ndarray],
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{bias name: (value in ``runnable``, its float16 rounding)} of the layer biases the fold changed
    (``runnable``'s differs from ``float_model``'s on the kept channels) whose rounding keeps within
    HALF_WITHIN_STEP of each kept channel's step."""
    inits = {t.name: t for t in runnable.graph.initializer}
    before = {t.name: t for t in float_model.graph.initializer}
    out = {}
    for layer in layers:
        tensor = inits.get(layer.bias)
        if tensor is None or layer.weight not in steps or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        value = onnx.numpy_helper.to_array(tensor)
        kept = ~dropped[layer.weight] if layer.weight in dropped else np.ones(len(steps[layer.weight]), bool)
        if kept.shape != steps[layer.weight].shape or value.shape != (int(kept.sum()),):
            continue  # a bias the removal reshaped otherwise: left as it is
        if np.array_equal(value, onnx.numpy_helper.to_array(before[layer.bias])[kept]):
            continue  # nothing folded into it
        half = half_within(value, np.asarray(steps[layer.weight][kept], np.float64) * HALF_WITHIN_STEP)
        if not np.array_equal(half, value):
            out[layer.bias] = (value, half)
    return out


def folded_biases_on_half(runnable: onnx.ModelProto, float_model: onnx.ModelProto, layers: list[BiasedLayer],
                          steps: dict[str, np.ndarray], dropped: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``runnable`` (without_dead_parts of ``float_model``) with the layer biases the fold took off
    float16 back on it, where no kept channel moves by more than HALF_WITHIN_STEP of its weight step.

    ``layers``: the model's biased layers (bias_correction.biased_layers); ``steps``: {weight name: one
    step per output channel of the full layer}; ``dropped``: without_dead_parts' masks. LeNet-5
    bn-s1's size plan: fc2's 69 folded biases, ~0.2 KB of a 12.6 KB storage form.
    """
    rounded = _rounded_biases(runnable, float_model, layers, steps, dropped)
    return with_weights(runnable, {name: half for name, (_, half) in rounded.items()}) if rounded else runnable


def fold_rounding(float_model: onnx.ModelProto, values: dict[str, np.ndarray], layers: list[BiasedLayer],
                  steps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What folded_biases_on_half changes in a build of ``float_model``, as {bias name: the full model's
    bias plus that change}: run with these biases, the full model (dead channels zeroed, not removed)
    computes what the build runs. ``values``: the compressed weights; ``float_model`` holds them and
    the (corrected) biases. {} when no channel goes or no folded bias rounds.

    The removal keeps the full model's function (exactly, in float32), so a reader's bias after the
    fold is b' = b + c; the build rounds it to h, which moves the reader's output by h - b': added to b
    in the full model, the same output. Raises ModelError as without_dead_parts does.
    """
    runnable, dropped = without_dead_parts(float_model, values)
    if not dropped:
        return {}
    full = {t.name: t for t in float_model.graph.initializer}
    by_bias = {layer.bias: layer for layer in layers}
    out = {}
    for name, (value, half) in _rounded_biases(runnable, float_model, layers, steps, dropped).items():
        bias = onnx.numpy_helper.to_array(full[name]).astype(np.float32).copy()
        weight = by_bias[name].weight
        kept = ~dropped[weight] if weight in dropped else np.ones(bias.shape, bool)
        bias[kept] += half - value
        out[name] = bias
    return out
