"""Gradients through the evaluator: per-sample vmap(grad) = a loop, finite differences, functional weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests.analysis_eval.eval_models import assert_matches_ort
from toco_core.analysis.graph_eval import GraphEvaluator
from toco_core.onnx_model import compressible_weights, read_weights, with_weights


def _least_likely_loss(out: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one sample's logits [1, C] against its least likely class.

    Not the self-entropy: on a confident model its float32 gradients are rounding noise (~1e-11),
    which no comparison of two ways to compute them can use.
    """
    return -torch.log_softmax(out, dim=-1)[0].min()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_vmap_per_sample_grads_equal_a_loop(demo_models, digits, exporter):
    ev = GraphEvaluator(demo_models[("lenet5", exporter)])
    x = torch.from_numpy(digits)
    grad_one = torch.func.grad(lambda w, xi: _least_likely_loss(ev(xi[None], w)))
    batched = torch.func.vmap(grad_one, in_dims=(None, 0))(ev.weights, x)
    assert set(batched) == set(ev.weights)
    for i in range(len(x)):
        looped = torch.func.grad(lambda w: _least_likely_loss(ev(x[i : i + 1], w)))(ev.weights)
        for name, g in looped.items():
            assert batched[name].shape == (len(x), *ev.weights[name].shape)
            torch.testing.assert_close(batched[name][i], g, rtol=1e-4, atol=1e-6)
    # samples differ, so a broadcast of one gradient would not pass
    first = next(iter(batched.values()))
    assert not torch.allclose(first[0], first[1], rtol=1e-3, atol=0)


def test_vmap_through_dynamic_shape_arithmetic(test_models, digits):
    """Shape -> Gather -> Concat -> Reshape stays constant under vmap and grad."""
    ev = GraphEvaluator(test_models["ReshapeBatchNet-torchscript"])
    x = torch.from_numpy(digits[:4])
    grad_one = torch.func.grad(lambda w, xi: ev(xi[None], w).square().sum())
    batched = torch.func.vmap(grad_one, in_dims=(None, 0))(ev.weights, x)
    looped = torch.func.grad(lambda w: ev(x[2:3], w).square().sum())(ev.weights)
    for name in looped:
        torch.testing.assert_close(batched[name][2], looped[name], rtol=1e-4, atol=1e-6)


def _as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with float64 initializers and input, so a central difference is accurate."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    for t in new.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for v in (*new.graph.input, *new.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    return new


def test_gradient_matches_finite_differences(demo_models, digits):
    model = demo_models[("lenet5", "torchscript")]
    names = [w.name for w in compressible_weights(model)]
    ev = GraphEvaluator(_as_float64(model), trainable=names)
    x = torch.from_numpy(digits[:4]).double()
    w64 = {k: v.double() for k, v in ev.weights.items()}

    def loss(w):
        return torch.log_softmax(ev(x, w), -1)[:, 3].sum()

    grad = torch.func.grad(loss)(w64)["3.weight"]
    h = 1e-6
    for idx in [(0, 0, 0, 0), (5, 2, 3, 1), (15, 5, 4, 4)]:
        plus = {**w64, "3.weight": w64["3.weight"].clone()}
        minus = {**w64, "3.weight": w64["3.weight"].clone()}
        plus["3.weight"][idx] += h
        minus["3.weight"][idx] -= h
        numeric = (loss(plus) - loss(minus)) / (2 * h)
        assert abs(float(numeric) - float(grad[idx])) <= 1e-6 * max(1.0, abs(float(numeric)))
    assert float(grad.abs().max()) > 0


def test_weights_override_is_functional_and_matches_onnxruntime(demo_models, digits):
    model = demo_models[("mlp", "dynamo")]
    ev = GraphEvaluator(model)
    before = {k: v.clone() for k, v in ev.weights.items()}
    rng = np.random.default_rng(3)
    noisy = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in read_weights(model).items()}
    out = ev(torch.from_numpy(digits), {"1.weight": torch.from_numpy(noisy["1.weight"])})
    partial = with_weights(model, {"1.weight": noisy["1.weight"]})
    assert_matches_ort(partial, out, digits)
    for k in before:
        assert torch.equal(ev.weights[k], before[k])
    full = ev(torch.from_numpy(digits), {k: torch.from_numpy(v) for k, v in noisy.items()})
    assert_matches_ort(with_weights(model, noisy), full, digits)


def test_trainable_subset_and_non_weight_initializer(demo_models, digits):
    model = demo_models[("lenet5", "torchscript")]
    ev = GraphEvaluator(model, trainable=["0.bias", "7.weight"])
    assert list(ev.weights) == ["0.bias", "7.weight"]
    x = torch.from_numpy(digits[:2])
    g = torch.func.grad(lambda w: ev(x, w).sum())(ev.weights)
    assert g["0.bias"].shape == (6,) and float(g["0.bias"].abs().sum()) > 0
