"""Bias correction: which layers it touches, the means it restores, and what it buys on real digits."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from tests.compression_formats.graphs import initializers_as_constants, make_model
from toco_core.compression.bias_correction import biased_layers, correct_biases
from toco_core.onnx_model import compressible_weights, read_weights, with_weights
from toco_core.runtime import run_model, run_outputs

RNG = np.random.default_rng(3)


def conv_gemm_matmul() -> onnx.ModelProto:
    """x[N,2,6,6] -> Conv(4, bias) -> Relu -> Flatten -> Gemm(5, bias) -> Relu -> MatMul(3) -> y."""
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], transB=1),
        helper.make_node("Relu", ["g"], ["h"]),
        helper.make_node("MatMul", ["h", "mw"], ["y"]),
    ]
    inits = {"cw": RNG.normal(size=(4, 2, 3, 3)).astype(np.float32), "cb": RNG.normal(size=4).astype(np.float32),
             "gw": RNG.normal(size=(5, 144)).astype(np.float32) * 0.1, "gb": RNG.normal(size=5).astype(np.float32),
             "mw": RNG.normal(size=(5, 3)).astype(np.float32)}
    return make_model(nodes, ["N", 2, 6, 6], ["N", 3], inits)


def test_biased_layers_are_conv_and_gemm_with_per_channel_bias_in_graph_order():
    model = conv_gemm_matmul()
    layers = biased_layers(model, compressible_weights(model))
    assert [(l.weight, l.bias, l.output) for l in layers] == [("cw", "cb", "c"), ("gw", "gb", "g")]
    # a Constant-node bias is left alone (nothing to overwrite in place)
    assert biased_layers(initializers_as_constants(model), compressible_weights(initializers_as_constants(model))) == []


def test_corrected_biases_restore_every_layers_channel_means_on_the_fitted_samples():
    model = conv_gemm_matmul()
    infos = compressible_weights(model)
    w = read_weights(model, infos)
    # a systematic error: every weight shrunk by 30%, which shifts every channel's mean
    shrunk = {k: v * np.float32(0.7) for k, v in w.items()}
    x = RNG.uniform(0, 1, size=(64, 2, 6, 6)).astype(np.float32)  # like pixels: a non-zero mean
    biases = correct_biases(model, infos, shrunk, x)
    assert set(biases) == {"cb", "gb"}
    base_c, base_g = run_outputs(model, {}, x, ["c", "g"])
    raw_c, raw_g = run_outputs(model, shrunk, x, ["c", "g"])
    new_c, new_g = run_outputs(model, {**shrunk, **biases}, x, ["c", "g"])
    for base, raw, new in ((base_c, raw_c, new_c), (base_g, raw_g, new_g)):
        axes = tuple(i for i in range(base.ndim) if i != 1)
        shift_before = np.abs(raw.mean(axis=axes) - base.mean(axis=axes)).max()
        shift_after = np.abs(new.mean(axis=axes) - base.mean(axis=axes)).max()
        assert shift_before > 0.05
        assert shift_after < 1e-4
    # the weights themselves are not touched: the correction only returns biases
    assert all(np.array_equal(shrunk[k], v * np.float32(0.7)) for k, v in w.items())


def test_no_samples_or_no_biased_layer_returns_nothing():
    model = conv_gemm_matmul()
    infos = compressible_weights(model)
    w = read_weights(model, infos)
    assert correct_biases(model, infos, w, np.zeros((0, 2, 6, 6), np.float32)) == {}
    assert correct_biases(model, infos, {"mw": w["mw"]}, RNG.normal(size=(4, 2, 6, 6)).astype(np.float32)) == {}


def test_run_outputs_reads_intermediate_tensors_with_replaced_weights():
    model = conv_gemm_matmul()
    x = RNG.normal(size=(3, 2, 6, 6)).astype(np.float32)
    zero_gemm = {"gw": np.zeros((5, 144), np.float32)}
    (g,) = run_outputs(model, zero_gemm, x, ["g"])
    gb = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "gb"))
    np.testing.assert_allclose(g, np.broadcast_to(gb, (3, 5)), rtol=0, atol=1e-6)
    # the model itself keeps its one output
    assert [o.name for o in model.graph.output] == ["y"]


def test_correction_cuts_the_logit_error_of_compressed_lenet_on_unseen_digits(demo, splits):
    model = demo[("lenet5", "torchscript")]
    infos = compressible_weights(model)
    w = read_weights(model, infos)
    # prune 60% of each layer by magnitude and round to 4-bit steps: a real compressed model
    values = {}
    for k, v in w.items():
        kept = np.where(np.abs(v) > np.quantile(np.abs(v), 0.6), v, 0)
        step = np.abs(v).max() / 7
        values[k] = (np.round(kept / step) * step).astype(np.float32)
    biases = correct_biases(model, infos, values, splits.x_pool[:256])
    unseen = splits.x_heldout[:500]
    base = run_model(model, unseen)
    err_raw = np.abs(run_model(with_weights(model, values), unseen) - base).mean()
    err_fixed = np.abs(run_model(with_weights(model, {**values, **biases}), unseen) - base).mean()
    assert err_fixed < 0.9 * err_raw
