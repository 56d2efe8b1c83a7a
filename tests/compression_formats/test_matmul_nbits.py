"""MatMulNBits: per-weight (bits, block) choices, error exactly as the runtime dequantizes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from onnx import helper
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

from tests.compression_formats.graphs import make_model, op_counts
from toco_core.compression.matmul_nbits import (
    best_nbits_choice,
    nbits_nbytes,
    nbits_weight_error,
    quantize_matmul_nbits,
)
from toco_core.errors import ConfigError, ModelError
from toco_core.onnx_model import compressible_weights, read_weights
from toco_core.runtime import run_model

RNG = np.random.default_rng(0)


def matmul_model(k: int, n: int) -> tuple:
    w = RNG.normal(size=(k, n)).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], ["b", k], ["b", n], {"W": w}), w


@pytest.mark.parametrize("k,n,bits,block", [(100, 37, 4, 32), (64, 16, 8, 16), (300, 20, 4, 128), (33, 5, 8, 64)])
def test_runtime_dequantizes_exactly_as_predicted(k, n, bits, block):
    model, w = matmul_model(k, n)
    q = quantize_matmul_nbits(model, {"W": (bits, block)}, accuracy_level=0)
    assert op_counts(q) == {"MatMulNBits": 1} and "W" not in {t.name for t in q.graph.initializer}
    # x = identity makes the runtime print the weight it really multiplies with
    runtime_w = run_model(q, np.eye(k, dtype=np.float32))
    np.testing.assert_array_equal(np.abs(w - runtime_w), nbits_weight_error(w, bits, block))
    step = (w.max() - w.min()) / (2**bits - 1)
    assert 0 < nbits_weight_error(w, bits, block).max() <= step


def test_same_model_as_onnxruntimes_quantizer():
    model, _ = matmul_model(256, 48)
    ours = quantize_matmul_nbits(model, {"W": (4, 64)}, accuracy_level=0)
    theirs = MatMulNBitsQuantizer(copy.deepcopy(model), algo_config=DefaultWeightOnlyQuantConfig(block_size=64, bits=4))
    theirs.process()
    x = RNG.normal(size=(5, 256)).astype(np.float32)
    np.testing.assert_array_equal(run_model(ours, x), run_model(theirs.model.model, x))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_gemm_layers_of_lenet5_with_per_weight_choices(demo, heldout, exporter):
    model = demo[("lenet5", exporter)]
    choices = {"7.weight": (4, 32), "9.weight": (8, 16), "11.weight": (4, 16)}
    for level in (0, 4):
        q = quantize_matmul_nbits(model, choices, accuracy_level=level)
        counts = op_counts(q)
        assert counts["MatMulNBits"] == 3 and counts["Gemm"] == 0 and counts["Conv"] == 2 and counts["Add"] == 3
        nodes = {n.input[1]: n for n in q.graph.node if n.op_type == "MatMulNBits"}
        bits = {n.input[1].split("_Q")[0]: next(a.i for a in n.attribute if a.name == "bits") for n in nodes.values()}
        assert bits == {"7.weight": 4, "9.weight": 8, "11.weight": 4}
        base, out = run_model(model, heldout), run_model(q, heldout)
        assert (base.argmax(1) == out.argmax(1)).mean() >= 0.98
        assert np.abs(base - out).mean() < 0.05 * np.abs(base).mean()
    assert len(q.SerializeToString()) < 0.3 * len(model.SerializeToString())


def test_gemm_error_uses_k_axis_of_the_gemm_weight(demo, heldout):
    model = demo[("mlp", "torchscript")]
    info = next(w for w in compressible_weights(model) if w.name == "3.weight")  # Gemm transB=1: [N, K]
    w = read_weights(model)[info.name]
    err = nbits_weight_error(w, 4, 16, k_axis=1 - info.out_axis)
    assert err.shape == w.shape
    np.testing.assert_array_equal(err, nbits_weight_error(w.T, 4, 16, k_axis=0).T)
    q = quantize_matmul_nbits(model, {info.name: (4, 16)}, accuracy_level=0)
    assert op_counts(q)["MatMulNBits"] == 1 and op_counts(q)["Gemm"] == 2
    base, out = run_model(model, heldout), run_model(q, heldout)
    assert (base.argmax(1) == out.argmax(1)).mean() >= 0.99


def test_gemm_rewrite_keeps_beta_c_and_transposes_b():
    w, c = RNG.normal(size=(6, 40)).astype(np.float32), RNG.normal(size=6).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1, beta=0.5, name="g")
    model = make_model([node], ["b", 40], ["b", 6], {"W": w, "C": c})
    q = quantize_matmul_nbits(model, {"W": (4, 16)}, accuracy_level=0)
    assert op_counts(q) == {"MatMulNBits": 1, "Add": 1}
    runtime_w = (run_model(q, np.eye(40, dtype=np.float32)) - 0.5 * c).T  # x = I: y = W_deq^T + beta C
    np.testing.assert_allclose(np.abs(w - runtime_w), nbits_weight_error(w, 4, 16, k_axis=1), atol=1e-6)


def test_best_choice_is_the_cheapest_within_tolerance():
    w = RNG.normal(size=(512, 64)).astype(np.float32)
    loose = best_nbits_choice(w, np.full_like(w, 10.0))
    assert loose == (4, 256)  # largest block, fewest scales
    assert best_nbits_choice(w, np.full_like(w, 1e-5)) is None
    mid = best_nbits_choice(w, np.full_like(w, 0.05), coverage=0.99)
    assert mid is not None and (nbits_weight_error(w, *mid) <= 0.05).mean() >= 0.99
    cheaper = [(b, s) for b in (4, 8) for s in (16, 32, 64, 128, 256)
               if nbits_nbytes(512, 64, b, s) < nbits_nbytes(512, 64, *mid)]
    assert all((nbits_weight_error(w, b, s) <= 0.05).mean() < 0.99 for b, s in cheaper)
    assert nbits_nbytes(512, 64, 4, 32) == 64 * (512 // 2 + 16 * 4 + 8)


def test_bad_choices_are_refused(demo):
    model = demo[("lenet5", "torchscript")]
    with pytest.raises(ConfigError):
        quantize_matmul_nbits(model, {"7.weight": (3, 32)})
    with pytest.raises(ConfigError):
        quantize_matmul_nbits(model, {"7.weight": (4, 48)})
    with pytest.raises(ConfigError, match="accuracy_level"):
        quantize_matmul_nbits(model, {"7.weight": (4, 32)}, accuracy_level=7)
    with pytest.raises(ModelError, match="MatMul or Gemm"):
        quantize_matmul_nbits(model, {"0.weight": (4, 32)})
    with pytest.raises(ValueError):
        best_nbits_choice(np.zeros((4, 4), np.float32), np.zeros((4, 5)))
