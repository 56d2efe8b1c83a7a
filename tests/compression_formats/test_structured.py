"""Structured pruning: channels really removed, outputs equal to the zeroed model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.compression_formats.graphs import init_shapes, initializers_as_constants, make_model, op_counts
from toco_core.compression.channel_routes import unread_channels
from toco_core.compression.structured import (
    dead_channels,
    removable_channels,
    remove_output_channels,
    structured_support,
)
from toco_core.errors import ModelError
from toco_core.onnx_model import compressible_weights, read_weights, with_weights
from toco_core.runtime import run_model

RNG = np.random.default_rng(0)


def smallest_l1_masks(model: onnx.ModelProto, share: float) -> dict[str, np.ndarray]:
    """Per supported layer: the ``share`` of output channels with the smallest L1 norm."""
    weights, support = read_weights(model), structured_support(model)
    masks = {}
    for info in compressible_weights(model):
        if support[info.name] is None:
            w = np.moveaxis(weights[info.name], info.out_axis, 0)
            l1 = np.abs(w).reshape(len(w), -1).sum(axis=1)
            mask = np.zeros(len(l1), dtype=bool)
            mask[np.argsort(l1)[: int(len(l1) * share)]] = True
            masks[info.name] = mask
    return masks


def zeroed(model: onnx.ModelProto, masks: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The same model with the masked output channels' weights set to zero (shapes unchanged)."""
    infos = {w.name: w for w in compressible_weights(model)}
    weights = read_weights(model)
    for name, mask in masks.items():
        np.moveaxis(weights[name], infos[name].out_axis, 0)[mask] = 0.0
    return with_weights(model, {n: weights[n] for n in masks})


@pytest.mark.parametrize("arch", ["lenet5", "mlp"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_demo_model_removal_equals_zeroed_model(demo, heldout, arch, exporter):
    model = demo[(arch, exporter)]
    masks = smallest_l1_masks(model, 0.4)
    pruned = remove_output_channels(model, masks)
    onnx.checker.check_model(pruned)
    before, after = init_shapes(model), init_shapes(pruned)
    infos = {w.name: w for w in compressible_weights(model)}
    for name, mask in masks.items():
        assert after[name][infos[name].out_axis] == before[name][infos[name].out_axis] - mask.sum()
    assert sum(np.prod(s) for s in after.values()) < 0.75 * sum(np.prod(s) for s in before.values())
    assert len(pruned.SerializeToString()) < 0.75 * len(model.SerializeToString())
    ref, out = run_model(zeroed(model, masks), heldout), run_model(pruned, heldout)
    assert out.shape == ref.shape == (len(heldout), 10)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert np.abs(run_model(model, heldout) - out).max() > 1e-2  # the removal did change the model


def test_lenet5_consumer_shapes(demo):
    model = demo[("lenet5", "torchscript")]
    masks = {"0.weight": np.array([1, 0, 0, 1, 0, 0], bool), "3.weight": np.isin(np.arange(16), [3, 7])}
    shapes = init_shapes(remove_output_channels(model, masks))
    assert shapes["0.weight"] == (4, 1, 5, 5) and shapes["0.bias"] == (4,)
    assert shapes["3.weight"] == (14, 4, 5, 5) and shapes["3.bias"] == (14,)
    assert shapes["7.weight"] == (120, 14 * 25)  # Flatten: channel c -> 25 contiguous features


def test_removable_channels_follow_tolerance(demo):
    model = demo[("lenet5", "torchscript")]
    weights = read_weights(model)
    tau = {n: np.zeros_like(w) for n, w in weights.items()}
    # channels 2 and 4 of the first conv within tolerance, channel 5 only partly
    for c in (2, 4):
        tau["0.weight"][c] = np.abs(weights["0.weight"][c])
    tau["0.weight"][5, 0, 0] = np.abs(weights["0.weight"][5, 0, 0]) + 1
    masks = removable_channels(model, weights, tau)
    assert np.flatnonzero(masks["0.weight"]).tolist() == [2, 4]
    assert not any(m.any() for n, m in masks.items() if n != "0.weight")
    huge = {n: np.full_like(w, 1e3) for n, w in weights.items()}
    masks = removable_channels(model, weights, huge)
    for name in ("0.weight", "3.weight", "7.weight", "9.weight"):
        assert (~masks[name]).sum() == 1  # never every channel
    assert not masks["11.weight"].any()  # feeds the graph output: shapes must stay


def _bn_conv_model(pads: list[int], bias: np.ndarray) -> onnx.ModelProto:
    c = 4
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "s", "bb", "m", "v"], ["bn"]),
        helper.make_node("LeakyRelu", ["bn"], ["r"], alpha=0.1),
        helper.make_node("Conv", ["r", "w2"], ["c2"], pads=pads),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1),
    ]
    inits = {"w1": RNG.normal(size=(c, 2, 3, 3)), "b1": bias, "s": RNG.uniform(0.5, 2, c), "bb": RNG.normal(size=c),
             "m": RNG.normal(size=c), "v": RNG.uniform(0.5, 2, c), "w2": RNG.normal(size=(5, c, 3, 3)),
             "w3": RNG.normal(size=(3, 5)), "b3": RNG.normal(size=3)}
    return make_model(nodes, ["n", 2, 8, 8], ["n", 3], {k: np.asarray(v, np.float32) for k, v in inits.items()})


def test_batchnorm_chain_and_conv_fold_exact_without_padding():
    model = _bn_conv_model([0, 0, 0, 0], RNG.normal(size=4).astype(np.float32))
    x = RNG.normal(size=(6, 2, 8, 8)).astype(np.float32)
    masks = {"w1": np.array([0, 1, 0, 1], bool)}
    pruned = remove_output_channels(model, masks)
    shapes = init_shapes(pruned)
    assert shapes["w1"] == (2, 2, 3, 3) and shapes["s"] == shapes["m"] == (2,) and shapes["w2"] == (5, 2, 3, 3)
    np.testing.assert_allclose(run_model(pruned, x), run_model(zeroed(model, masks), x), atol=1e-4)
    assert op_counts(pruned) == op_counts(model)


def test_conv_fold_with_padding_is_approximate_only_at_the_border():
    model = _bn_conv_model([1, 1, 1, 1], RNG.normal(size=4).astype(np.float32))
    x = RNG.normal(size=(6, 2, 8, 8)).astype(np.float32)
    masks = {"w1": np.array([0, 1, 0, 0], bool)}
    pruned, ref = remove_output_channels(model, masks), zeroed(model, masks)
    diff = np.abs(run_model(pruned, x) - run_model(ref, x)).max()
    full = np.abs(run_model(model, x) - run_model(ref, x)).max()
    assert 0 < diff < full


def test_a_zero_channel_stays_where_a_padded_conv_reader_would_see_its_constant():
    """dead_channels only offers exact removals: a zero-weight channel whose constant (here
    LeakyRelu(BatchNorm(bias)), non-zero) reaches a padded Conv stays; without padding it goes, and
    the smaller model computes what the zeroed one does."""
    x = RNG.normal(size=(6, 2, 8, 8)).astype(np.float32)
    for pads, dropped in (([0, 0, 0, 0], [1]), ([1, 1, 1, 1], [])):
        model = _bn_conv_model(pads, RNG.normal(size=4).astype(np.float32))
        weights = read_weights(model)
        weights["w1"][1] = 0.0
        zeroed_model = with_weights(model, weights)
        drop = dead_channels(zeroed_model, {"w1": weights["w1"]})
        assert np.flatnonzero(drop["w1"]).tolist() == dropped, pads
        if dropped:
            np.testing.assert_allclose(run_model(remove_output_channels(zeroed_model, drop), x),
                                       run_model(zeroed_model, x), atol=1e-4)


def test_matmul_readers_get_the_folded_constant():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Sigmoid", ["hb"], ["s"]), helper.make_node("MatMul", ["s", "w2"], ["y"])]
    inits = {"w1": RNG.normal(size=(6, 8)), "b1": RNG.normal(size=8), "w2": RNG.normal(size=(8, 3))}
    model = make_model(nodes, ["n", 6], ["n", 3], {k: v.astype(np.float32) for k, v in inits.items()})
    masks = {"w1": np.array([1, 0, 0, 1, 1, 0, 0, 0], bool)}
    pruned = remove_output_channels(model, masks)
    assert init_shapes(pruned)["w1"] == (6, 5) and init_shapes(pruned)["b1"] == (5,)
    assert init_shapes(pruned)["w2"] == (5, 3)
    assert op_counts(pruned)["Add"] == 2  # sigmoid(b1) of the removed units cannot vanish: an Add carries it
    x = RNG.normal(size=(7, 6)).astype(np.float32)
    np.testing.assert_allclose(run_model(pruned, x), run_model(zeroed(model, masks), x), atol=1e-5)


def test_unsupported_graphs_are_refused_with_a_reason():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "x"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = {"w1": RNG.normal(size=(4, 4)), "w2": RNG.normal(size=(4, 2))}
    model = make_model(nodes, ["n", 4], ["n", 2], {k: v.astype(np.float32) for k, v in inits.items()})
    support = structured_support(model)
    assert "Add" in support["w1"] and "graph output" in support["w2"]
    weights = read_weights(model)
    masks = removable_channels(model, weights, {n: np.full_like(w, 10.0) for n, w in weights.items()})
    assert not masks["w1"].any()
    with pytest.raises(ModelError, match="cannot remove output channels of 'w1'"):
        remove_output_channels(model, {"w1": np.array([1, 0, 0, 0], bool)})


def test_a_mask_of_every_channel_is_refused(demo):
    with pytest.raises(ModelError, match="keep at least one"):
        remove_output_channels(demo[("mlp", "torchscript")], {"1.weight": np.ones(300, bool)})


def test_weights_stored_as_constant_nodes(demo, heldout):
    model = initializers_as_constants(demo[("lenet5", "dynamo")])
    assert not model.graph.initializer
    masks = smallest_l1_masks(model, 0.3)
    pruned = remove_output_channels(model, masks)
    assert read_weights(pruned)["3.weight"].shape == (16 - 4, 6 - 1, 5, 5)
    np.testing.assert_allclose(run_model(pruned, heldout), run_model(zeroed(model, masks), heldout), atol=1e-4)


def test_channels_no_reader_uses_are_found_and_removed_exactly(demo, heldout):
    """A channel whose readers' weights are all zero carries nothing: it goes, whatever its own weights."""
    model = demo[("lenet5", "torchscript")]
    weights = read_weights(model)
    weights["3.weight"][:, [1, 4]] = 0.0  # conv2 reads nothing of conv1's channels 1 and 4
    weights["7.weight"][:, 5 * 25:6 * 25] = 0.0  # fc1 reads nothing of conv2's channel 5 (25 features)
    unused = with_weights(model, weights)
    unread = unread_channels(unused, weights)
    assert np.flatnonzero(unread["0.weight"]).tolist() == [1, 4]
    assert np.flatnonzero(unread["3.weight"]).tolist() == [5]
    assert not unread["7.weight"].any() and not unread["9.weight"].any()
    drop = dead_channels(unused, weights)
    assert all(np.array_equal(drop[k], unread[k]) for k in drop)  # no layer's own weights are all zero here
    smaller = remove_output_channels(unused, drop)
    shapes = init_shapes(smaller)
    assert shapes["0.weight"] == (4, 1, 5, 5) and shapes["3.weight"] == (15, 4, 5, 5)
    assert shapes["7.weight"] == (120, 375)
    np.testing.assert_allclose(run_model(smaller, heldout), run_model(unused, heldout), atol=1e-5, rtol=1e-5)
    # a layer nobody reads keeps one channel: the one with the largest weights
    weights["9.weight"][:] = 0.0
    drop = dead_channels(with_weights(model, weights), weights)
    l1 = np.abs(weights["7.weight"]).sum(axis=1)
    assert np.flatnonzero(~drop["7.weight"]).tolist() == [int(np.argmax(l1))]
