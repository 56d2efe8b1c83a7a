"""Bias correction: which layers it touches, the means it restores, and what it buys on real digits."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from tests.compression_formats.graphs import initializers_as_constants, make_model
from toco_core.compression.bias_correction import (
    BiasCorrection,
    apply_deltas,
    biased_layers,
    channel_means,
    delta_exponent,
    on_delta_grid,
)
from toco_core.onnx_model import compressible_weights, read_weights, with_outputs, with_weights
from toco_core.runtime import run_model

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
    assert [(layer.weight, layer.bias, layer.output) for layer in layers] == [("cw", "cb", "c"), ("gw", "gb", "g")]
    # a Constant-node bias is left alone (nothing to overwrite in place)
    assert biased_layers(initializers_as_constants(model), compressible_weights(initializers_as_constants(model))) == []


def test_corrected_biases_restore_every_layers_channel_means_on_the_fitted_samples():
    model = conv_gemm_matmul()
    infos = compressible_weights(model)
    w = read_weights(model, infos)
    # a systematic error: every weight shrunk by 30%, which shifts every channel's mean
    shrunk = {k: v * np.float32(0.7) for k, v in w.items()}
    x = RNG.uniform(0, 1, size=(64, 2, 6, 6)).astype(np.float32)  # like pixels: a non-zero mean
    biases = BiasCorrection(model, infos, x).biases(shrunk)
    assert set(biases) == {"cb", "gb"}
    exposed = with_outputs(model, ["c", "g"])
    base = channel_means(exposed, {}, x, ["c", "g"])
    raw = channel_means(exposed, shrunk, x, ["c", "g"])
    new = channel_means(exposed, {**shrunk, **biases}, x, ["c", "g"])
    for b, r, n in zip(base, raw, new, strict=True):
        assert np.abs(r - b).max() > 0.05
        # the deltas travel on a grid of at most 1/64 of the layer's largest delta (on_delta_grid)
        assert np.abs(n - b).max() < np.abs(r - b).max() / 64
    # the weights themselves are not touched: the correction only returns biases
    assert all(np.array_equal(shrunk[k], v * np.float32(0.7)) for k, v in w.items())


def test_deltas_lie_on_a_power_of_two_grid_exact_in_float16():
    rng = np.random.default_rng(11)
    for scale in (1e-9, 1e-5, 0.3, 40.0):
        d = rng.normal(size=50) * scale
        g = on_delta_grid(d)
        assert g.dtype == np.float16
        step = 2.0 ** delta_exponent(d)
        q = g.astype(np.float64) / step
        assert np.array_equal(q, np.rint(q)) and np.abs(q).max() <= 127
        assert step <= max(np.abs(d).max() / 63, 2.0**-24)
        assert np.abs(g.astype(np.float64) - d).max() <= step / 2 + 1e-12
    assert not on_delta_grid(np.zeros(3)).any()


def test_corrected_biases_go_to_float16_only_where_the_deltas_grid_or_the_weight_steps_are_no_finer():
    """float16(b + d) where its rounding is within max|d| / 256 (the correction is known no better),
    else float32(b + d) exactly: large biases with small shifts, and uncorrected layers, stay."""
    rng = np.random.default_rng(5)
    b = {"small": rng.normal(size=40).astype(np.float32) * 0.2,
         "large": (1000 + rng.normal(size=40)).astype(np.float32),
         "still": rng.normal(size=40).astype(np.float32)}
    d = {"small": on_delta_grid(rng.normal(size=40) * 0.5), "large": on_delta_grid(rng.normal(size=40) * 0.01),
         "still": on_delta_grid(np.zeros(40))}
    out = apply_deltas(b, d)
    exact = {k: (b[k] + d[k].astype(np.float32)).astype(np.float32) for k in b}
    half = out["small"].astype(np.float16).astype(np.float32)
    assert np.array_equal(half, out["small"]) and not np.array_equal(out["small"], exact["small"])
    assert np.abs(out["small"] - exact["small"]).max() <= np.abs(d["small"].astype(np.float32)).max() / 256
    # float16's spacing at 1000 is 0.5: far coarser than shifts of ~0.01, so the layer keeps float32
    assert np.array_equal(out["large"], exact["large"]) and np.array_equal(out["still"], b["still"])
    assert all(v.dtype == np.float32 for v in out.values())

    # ... unless its weights are on steps that coarse: a rounding under a sixteenth of the channel's
    # step is below what each of its weights moves by (BatchNorm-folded Conv biases at a size plan)
    coarse = apply_deltas(b, d, {"large": np.full(40, 16 * 0.25, np.float32)})
    assert np.array_equal(coarse["large"].astype(np.float16).astype(np.float32), coarse["large"])
    assert np.abs(coarse["large"] - exact["large"]).max() <= 0.25
    one_fine = np.full(40, 4.0, np.float32)
    one_fine[7] = 1e-3  # every channel must allow it: a layer's biases travel in one width
    assert np.array_equal(apply_deltas(b, d, {"large": one_fine})["large"], exact["large"])


def test_no_samples_or_no_biased_layer_returns_nothing():
    model = conv_gemm_matmul()
    infos = compressible_weights(model)
    w = read_weights(model, infos)
    assert BiasCorrection(model, infos, np.zeros((0, 2, 6, 6), np.float32)).biases(w) == {}
    assert BiasCorrection(model, infos, RNG.normal(size=(4, 2, 6, 6)).astype(np.float32)).biases({"mw": w["mw"]}) == {}


def test_channel_means_read_intermediate_tensors_with_replaced_weights_in_any_batch_size():
    model = conv_gemm_matmul()
    exposed = with_outputs(model, ["c", "g"])
    x = RNG.uniform(0, 1, size=(7, 2, 6, 6)).astype(np.float32)
    zero_gemm = {"gw": np.zeros((5, 144), np.float32)}
    c_means, g_means = channel_means(exposed, zero_gemm, x, ["c", "g"], batch_size=3)
    gb = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "gb"))
    np.testing.assert_allclose(g_means, gb, rtol=0, atol=1e-6)  # a zero weight leaves the bias alone
    c_out = run_model(_only_output(model, "c"), x)
    np.testing.assert_allclose(c_means, c_out.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    # with_outputs copies: the model itself keeps its one output
    assert [o.name for o in model.graph.output] == ["y"]


def _only_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of ``model`` whose one output is the intermediate tensor ``name``."""
    one = with_outputs(model, [name])
    keep = [o for o in one.graph.output if o.name == name]
    del one.graph.output[:]
    one.graph.output.extend(keep)
    return one


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
    biases = BiasCorrection(model, infos, splits.x_pool[:256]).biases(values)
    unseen = splits.x_heldout[:500]
    base = run_model(model, unseen)
    err_raw = np.abs(run_model(with_weights(model, values), unseen) - base).mean()
    err_fixed = np.abs(run_model(with_weights(model, {**values, **biases}), unseen) - base).mean()
    assert err_fixed < 0.9 * err_raw
