"""Dense layers reading the model's input keep only the features their weights use (a Gather)."""

from __future__ import annotations

import numpy as np

from tests.compression_formats.graphs import init_shapes, op_counts, optimized_op_counts
from toco_core.compression.input_gather import (
    MIN_DROPPED_SHARE,
    MIN_DROPPED_WEIGHTS,
    gather_read_features,
    unread_input_features,
)
from toco_core.compression.qdq_int8 import quantize_qdq_int8
from toco_core.onnx_model import read_weights, with_weights
from toco_core.runtime import run_model


def _never_lit(splits) -> np.ndarray:
    """The pixels no training or pool digit lights: the MLP's first layer learnt nothing on them."""
    x = np.concatenate([splits.x_train, splits.x_pool]).reshape(-1, 784)
    return np.flatnonzero(np.abs(x).max(axis=0) == 0)


def test_the_first_layer_reads_only_the_pixels_its_weights_use(demo, splits, heldout, calib):
    model = demo[("mlp", "torchscript")]
    weights = read_weights(model)
    dark = _never_lit(splits)
    assert len(dark) > MIN_DROPPED_SHARE * 784 and 300 * len(dark) >= MIN_DROPPED_WEIGHTS  # MNIST's border
    weights["1.weight"][:, dark] = 0.0  # what a prune plan does to them (their saliency is zero)
    pruned = with_weights(model, weights)

    gathered, kept = gather_read_features(pruned)
    assert list(kept.values()) == [784 - len(dark)]
    assert init_shapes(gathered)["1.weight"] == (300, 784 - len(dark)) and op_counts(gathered)["Gather"] == 1
    # the weight loses 300 floats a dark pixel; the Gather costs one int32 index a kept one
    assert len(gathered.SerializeToString()) < len(pruned.SerializeToString()) - 4 * 300 * len(dark) + 4 * 784 + 512
    # exact on digits that light the dark pixels too: their weights are zero either way
    lit = heldout.copy()
    lit.reshape(len(lit), -1)[:, dark] = 1.0
    for x in (heldout, lit):
        np.testing.assert_allclose(run_model(gathered, x), run_model(pruned, x), atol=1e-5, rtol=1e-5)

    # the int8 form keeps its one integer chain: the Gather runs on the float input before it
    int8 = quantize_qdq_int8(gathered, None, calib)
    ops = optimized_op_counts(int8)
    assert ops["QGemm"] == 3 and ops["Gather"] == 1 and ops["DequantizeLinear"] == 1
    flips = (run_model(int8, heldout).argmax(1) != run_model(pruned, heldout).argmax(1)).mean()
    assert flips <= 0.01


def test_layers_whose_weights_read_almost_everything_are_left_alone(demo):
    model = demo[("mlp", "torchscript")]
    assert unread_input_features(model) == {}  # a trained layer reads every feature
    weights = read_weights(model)
    few = int(MIN_DROPPED_SHARE * 300) - 1
    weights["3.weight"][:, :few] = 0.0  # fewer unread features than a Gather's copy is worth
    sparse = with_weights(model, weights)
    same, kept = gather_read_features(sparse)
    assert same is sparse and kept == {}
    # half of the last layer's inputs unread, but 500 weights: a Gather would cost more than it saves
    # (the camera model's 30 us run measured 1.18x slower with one on a 686 -> 29 layer)
    weights["5.weight"][:, :50] = 0.0
    same, kept = gather_read_features(with_weights(model, weights))
    assert kept == {}
