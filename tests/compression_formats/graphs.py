"""Tiny ONNX graphs built with onnx.helper, and a look at what onnxruntime makes of a model."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes: list[onnx.NodeProto], x_shape: list, y_shape: list,
               inits: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    """A checked model with input ``x``, output ``y`` and the given float initializers."""
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def optimized_op_counts(model: onnx.ModelProto) -> collections.Counter:
    """Op types of the graph onnxruntime actually runs (after its fusions, all levels)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(path)
        opts.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    """Op types of the stored graph."""
    return collections.Counter(n.op_type for n in model.graph.node)


def init_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Initializer name -> shape."""
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def initializers_as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every initializer turned into a Constant node (Paddle-style export)."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}")
              for t in new.graph.initializer]
    nodes = consts + list(new.graph.node)
    del new.graph.node[:]
    new.graph.node.extend(nodes)
    del new.graph.initializer[:]
    onnx.checker.check_model(new)
    return new
