"""Classifiers as converters export them: probabilities plus a post-processing tail and a label output.

A small MLP is trained here with torch on scikit-learn's 8x8 digits and exported; the tails torch
cannot emit (a label lookup, ZipMap) are appended with onnx.helper.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from torch import nn

LABELS = [f"digit-{k}" for k in range(10)]


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pool x, pool y, held-out x, held-out y): float32 [N, 64] in [0, 1], int64 labels."""
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1200], y[:1200], x[1200:], y[1200:]


def train_mlp(x: np.ndarray, y: np.ndarray) -> nn.Module:
    """A 64-48-10 MLP ending in Softmax, trained full-batch for a second."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    return nn.Sequential(net, nn.Softmax(dim=1)).eval()


def export_probs(net: nn.Module, path: Path, output: str) -> onnx.ModelProto:
    """TorchScript export: input ``features`` [N, 64], one float output named ``output``."""
    torch.onnx.export(net, (torch.rand(2, 64),), str(path), input_names=["features"], output_names=[output],
                      dynamic_axes={"features": {0: "n"}, output: {0: "n"}}, dynamo=False)
    return onnx.load(str(path))


def _label_tail(probs: str) -> list[onnx.NodeProto]:
    """ArgMax over the classes, then the class index looked up in a string label table."""
    return [
        helper.make_node("ArgMax", [probs], ["class_index"], axis=1, keepdims=0, name="argmax"),
        helper.make_node("LabelEncoder", ["class_index"], ["label"], domain="ai.onnx.ml", name="labels",
                         keys_int64s=list(range(10)), values_strings=LABELS, default_string="unknown"),
    ]


def _with_tail(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
               outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    g = model.graph
    g.node.extend(nodes)
    del g.output[:]
    g.output.extend(outputs)
    if not any(o.domain == "ai.onnx.ml" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 2))
    onnx.checker.check_model(model)
    return model


def labelled_classifier(net: nn.Module, path: Path) -> onnx.ModelProto:
    """Outputs (label: string [N], probabilities: float [N, 10]); the label from ArgMax + LabelEncoder."""
    model = export_probs(net, path, "probabilities")
    probs = model.graph.output[0]
    label = helper.make_tensor_value_info("label", TensorProto.STRING, ["n"])
    model = _with_tail(model, _label_tail("probabilities"), [label, probs])
    onnx.save(model, str(path))
    return model


def zipmap_classifier(net: nn.Module, path: Path) -> onnx.ModelProto:
    """Outputs (label: string [N], probabilities: sequence of {class: probability} maps); the float
    probabilities are an internal tensor (``probs``) only."""
    model = export_probs(net, path, "probs")
    zipmap = helper.make_node("ZipMap", ["probs"], ["probabilities"], domain="ai.onnx.ml", name="zipmap",
                              classlabels_int64s=list(range(10)))
    label = helper.make_tensor_value_info("label", TensorProto.STRING, ["n"])
    maps = helper.make_value_info("probabilities", helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))))
    model = _with_tail(model, [*_label_tail("probs"), zipmap], [label, maps])
    onnx.save(model, str(path))
    return model


def weighted_tail_classifier(net: nn.Module, path: Path) -> onnx.ModelProto:
    """A second Gemm after the probabilities (outputs: probabilities, rescored): weights behind the scored output."""
    model = export_probs(net, path, "probabilities")
    w = numpy_helper.from_array(np.eye(10, dtype=np.float32), "rescore.weight")
    model.graph.initializer.append(w)
    model = _with_tail(model, [helper.make_node("MatMul", ["probabilities", "rescore.weight"], ["rescored"])],
                       [model.graph.output[0], helper.make_tensor_value_info("rescored", TensorProto.FLOAT, ["n", 10])])
    return model
