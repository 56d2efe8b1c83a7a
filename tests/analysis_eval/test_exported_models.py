"""The evaluator reproduces onnxruntime on real exports: demo models, the test CNNs, Constant weights."""

from __future__ import annotations

import onnx
import pytest
import torch

from tests.analysis_eval.eval_models import EXPORTERS, assert_matches_ort
from toco_core.analysis.graph_eval import GraphEvaluator
from toco_core.onnx_model import compressible_weights


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ["lenet5", "mlp"])
def test_demo_models_match_onnxruntime(demo_models, digits, arch, exporter):
    model = demo_models[(arch, exporter)]
    ev = GraphEvaluator(model)
    assert list(ev.weights) == [w.name for w in compressible_weights(model)]
    assert all(w.dtype == torch.float32 for w in ev.weights.values())
    assert_matches_ort(model, ev(torch.from_numpy(digits)), digits)


@pytest.mark.parametrize(
    "name",
    [f"{m}-{e}" for m in ("MixNet", "ReshapeBatchNet", "lenet5-constants") for e in EXPORTERS],
)
def test_test_models_match_onnxruntime(test_models, digits, name):
    model = test_models[name]
    ops = {n.op_type for n in model.graph.node}
    if name.startswith("MixNet"):  # the export kept what the test is about
        assert {"BatchNormalization", "HardSwish", "Concat", "Resize", "Add"} <= ops
        assert any(a.name == "group" and a.i > 1 for n in model.graph.node for a in n.attribute)
    if name.startswith("ReshapeBatchNet"):
        assert {"Reshape", "BatchNormalization"} <= ops
    ev = GraphEvaluator(model)
    # batch sizes other than the export's dummy batch of 2
    assert_matches_ort(model, ev(torch.from_numpy(digits)), digits)
    assert_matches_ort(model, ev(torch.from_numpy(digits[:1])), digits[:1])


def test_torchscript_reshape_is_dynamic(test_models):
    """The torchscript ReshapeBatchNet computes its Reshape target from Shape (what onnx2torch failed on)."""
    ops = [n.op_type for n in test_models["ReshapeBatchNet-torchscript"].graph.node]
    assert "Shape" in ops and ops.index("Shape") < ops.index("Reshape") < ops.index("BatchNormalization")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_constant_weights_are_keyed_and_differentiable_like_initializers(demo_models, test_models, digits, exporter):
    base = demo_models[("lenet5", exporter)]
    paddle = test_models[f"lenet5-constants-{exporter}"]
    assert not paddle.graph.initializer
    assert {w.source for w in compressible_weights(paddle)} == {"constant"}
    ev_base, ev_const = GraphEvaluator(base), GraphEvaluator(paddle)
    assert list(ev_const.weights) == list(ev_base.weights)
    x = torch.from_numpy(digits[:4])

    def loss(ev):
        return lambda w: torch.log_softmax(ev(x, w), -1)[:, 0].sum()

    g_base = torch.func.grad(loss(ev_base))(ev_base.weights)
    g_const = torch.func.grad(loss(ev_const))(ev_const.weights)
    for name in g_base:
        torch.testing.assert_close(g_const[name], g_base[name])
        assert g_base[name].abs().sum() > 0


def test_model_with_graph_input_initializers(demo_models, digits):
    """Old exporters list initializers among the graph inputs too; they are weights, not inputs."""
    model = onnx.ModelProto()
    model.CopyFrom(demo_models[("mlp", "torchscript")])
    model.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
    )
    ev = GraphEvaluator(model)
    assert ev.input_name == "image"
    assert_matches_ort(model, ev(torch.from_numpy(digits)), digits)
