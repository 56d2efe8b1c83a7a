"""Folded biases back on float16, and the calibration's view of that rounding (dead_parts)."""

from __future__ import annotations

import numpy as np
import onnx

from toco_core.compression.bias_correction import HALF_WITHIN_STEP, biased_layers
from toco_core.compression.dead_parts import fold_rounding, folded_biases_on_half, without_dead_parts
from toco_core.compression.storage import dequantize, encode_model, quantize_to_codes
from toco_core.onnx_model import compressible_weights, read_weights, with_weights
from toco_core.runtime import run_model


def _point(model, divisor: float):
    """LeNet-5 with every weight on `max|w| / divisor` steps, 40 of fc1's units rounded away, and fc1's
    biases on float16 (as a corrected build has them): a point whose removal folds into fc2's bias."""
    infos = compressible_weights(model)
    weights = read_weights(model, infos)
    tensors = []
    for info in infos:
        w = np.moveaxis(weights[info.name], info.out_axis, 0)
        steps = (np.abs(w).reshape(len(w), -1).max(axis=1) / divisor).astype(np.float32)
        tensors.append(quantize_to_codes(weights[info.name], steps, info.out_axis, info.name))
    codes = {q.name: q for q in tensors}
    codes["7.weight"].codes[:40] = 0
    values = {q.name: dequantize(q) for q in tensors}
    layers = biased_layers(model, infos)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    # positive biases on the dead units: their constant ReLU output is what the fold carries
    halves = {lay.bias: np.abs(inits[lay.bias]).astype(np.float16).astype(np.float32) + np.float32(0.5)
              for lay in layers}
    return with_weights(model, {**values, **halves}), values, layers, {q.name: q.steps for q in tensors}


def _bias(model, name):
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_a_folded_bias_goes_back_to_float16_and_the_full_model_with_fold_rounding_runs_the_same(demo, heldout):
    model = demo[("lenet5", "torchscript")]
    full, values, layers, steps = _point(model, 7)
    runnable, dropped = without_dead_parts(full, values)
    assert int(dropped["7.weight"].sum()) == 40
    folded = _bias(runnable, "9.bias")
    assert not np.array_equal(folded.astype(np.float16).astype(np.float32), folded)  # the fold left float16

    halved = folded_biases_on_half(runnable, full, layers, steps, dropped)
    rounded = _bias(halved, "9.bias")
    assert np.array_equal(rounded.astype(np.float16).astype(np.float32), rounded)
    assert (np.abs(rounded - folded) <= steps["9.weight"] * HALF_WITHIN_STEP).all()
    assert len(encode_model(halved, [])) < len(encode_model(runnable, []))  # 2 bytes a channel, not 4
    # the biases nothing was folded into are left as they were
    for name in ("7.bias", "11.bias"):
        assert np.array_equal(_bias(halved, name), _bias(runnable, name))

    # the calibration runs the full model (dead units zeroed, not removed) with fold_rounding's biases:
    # the function of the build, where the full model alone is off by the rounding
    rounding = fold_rounding(full, values, layers, steps)
    assert set(rounding) == {"9.bias"}
    calibrated = with_weights(full, rounding)
    np.testing.assert_allclose(run_model(calibrated, heldout), run_model(halved, heldout), atol=2e-5)
    assert np.abs(run_model(full, heldout) - run_model(halved, heldout)).max() > 1e-5


def test_fine_steps_keep_the_folded_bias_in_float32(demo):
    """A point on fine steps (a gentle plan) keeps the fold exact: float16 would move fc2's biases by
    more than a sixteenth of its weight steps, and the calibration has nothing to add."""
    model = demo[("lenet5", "torchscript")]
    full, values, layers, steps = _point(model, 2000)
    runnable, dropped = without_dead_parts(full, values)
    assert dropped and folded_biases_on_half(runnable, full, layers, steps, dropped) is runnable
    assert fold_rounding(full, values, layers, steps) == {}


def test_nothing_dead_nothing_rounded(demo):
    model = demo[("lenet5", "torchscript")]
    infos = compressible_weights(model)
    values = read_weights(model, infos)
    runnable, dropped = without_dead_parts(model, values)
    assert dropped == {}
    assert fold_rounding(model, values, biased_layers(model, infos), {}) == {}
