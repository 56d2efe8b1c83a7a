"""Clear errors instead of wrong answers: unsupported ops, bad weight names, data-dependent shapes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto
from onnx import helper as oh

from tests.analysis_eval.eval_models import tiny_model
from toco_core.analysis.graph_eval import GraphEvaluator, supported_ops
from toco_core.errors import ModelError, UnsupportedOpError

F32 = TensorProto.FLOAT
DOCS = Path(__file__).resolve().parents[2] / "docs" / "ops.md"


def _einsum_model():
    nodes = [
        oh.make_node("Relu", ["x"], ["r"], name="first_relu"),
        oh.make_node("Einsum", ["r", "w"], ["y"], name="mixing_einsum", equation="ij,jk->ik"),
    ]
    return tiny_model(nodes, [oh.make_tensor_value_info("x", F32, [2, 3])],
                      [oh.make_tensor_value_info("y", F32, None)],
                      {"w": np.ones((3, 4), np.float32)}, opset=17)


def _lstm_model():
    node = oh.make_node("LSTM", ["x", "W", "R"], ["", "y"], hidden_size=4)  # unnamed node
    inits = {"W": np.ones((1, 16, 3), np.float32), "R": np.ones((1, 16, 4), np.float32)}
    return tiny_model([node], [oh.make_tensor_value_info("x", F32, [5, 2, 3])],
                      [oh.make_tensor_value_info("y", F32, None)], inits, opset=17)


def test_einsum_is_refused_at_construction_naming_op_node_and_model():
    with pytest.raises(UnsupportedOpError) as err:
        GraphEvaluator(_einsum_model(), trainable=[])
    assert err.value.op_type == "Einsum" and err.value.node_name == "mixing_einsum"
    assert "Einsum" in str(err.value) and "mixing_einsum" in str(err.value) and "'tiny'" in str(err.value)
    assert "docs/ops.md" in str(err.value)


def test_lstm_is_refused_even_with_default_trainable_and_no_node_name():
    with pytest.raises(UnsupportedOpError, match=r"'LSTM' \(node 'LSTM#0'\)"):
        GraphEvaluator(_lstm_model())


def test_custom_domain_op_is_refused():
    node = oh.make_node("Relu", ["x"], ["y"], name="fancy", domain="com.example")
    graph = oh.make_graph([node], "custom", [oh.make_tensor_value_info("x", F32, [2])],
                          [oh.make_tensor_value_info("y", F32, [2])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOpError, match="com.example.Relu"):
        GraphEvaluator(model, trainable=[])


def test_unknown_or_non_float_trainable_names_are_refused(demo_models):
    model = demo_models[("lenet5", "torchscript")]
    with pytest.raises(ModelError, match="'no.such.weight'"):
        GraphEvaluator(model, trainable=["no.such.weight"])
    shaped = tiny_model([oh.make_node("Reshape", ["x", "s"], ["y"])], [oh.make_tensor_value_info("x", F32, [2, 3])],
                        [oh.make_tensor_value_info("y", F32, None)], {"s": np.array([3, 2], np.int64)})
    with pytest.raises(ModelError, match="not floats"):
        GraphEvaluator(shaped, trainable=["s"])


def test_unknown_override_name_is_refused(demo_models, digits):
    ev = GraphEvaluator(demo_models[("mlp", "torchscript")])
    with pytest.raises(ModelError, match="not trainable weights"):
        ev(torch.from_numpy(digits), {"1.bias": torch.zeros(300)})


def test_data_dependent_shape_under_vmap_names_the_node():
    nodes = [
        oh.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64),
        oh.make_node("Reshape", ["x", "xi"], ["y"], name="data_reshape"),
    ]
    model = tiny_model(nodes, [oh.make_tensor_value_info("x", F32, [2])], [oh.make_tensor_value_info("y", F32, None)])
    ev = GraphEvaluator(model, trainable=[])
    assert ev(torch.tensor([1.0, 2.0])).shape == (1, 2)  # fine eagerly
    with pytest.raises(ModelError, match="data_reshape.*depends on the input data"):
        torch.func.vmap(ev)(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))


def test_several_graph_inputs_are_fed_by_name_and_one_tensor_is_refused():
    node = oh.make_node("Sub", ["x", "z"], ["y"], name="subtract")
    graph = oh.make_graph([node], "two_inputs", [oh.make_tensor_value_info("x", F32, [2]),
                                                 oh.make_tensor_value_info("z", F32, [2])],
                          [oh.make_tensor_value_info("y", F32, [2])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    ev = GraphEvaluator(model, trainable=[])
    assert ev.input_names == ["x", "z"]
    out = ev({"x": torch.tensor([3.0, 1.0]), "z": torch.tensor([1.0, 1.0])})
    assert out.tolist() == [2.0, 0.0]
    with pytest.raises(ModelError, match="one tensor given.*'x', 'z'"):
        ev(torch.tensor([1.0, 2.0]))
    with pytest.raises(ModelError, match="inputs \\['x'\\] given"):
        ev({"x": torch.tensor([1.0, 2.0])})


def test_docs_list_exactly_the_supported_ops():
    documented = set(re.findall(r"^\| `(\w+)` \|", DOCS.read_text(), flags=re.M))
    assert documented == set(supported_ops())
    assert "Einsum" not in supported_ops() and "LSTM" not in supported_ops()
