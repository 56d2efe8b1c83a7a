"""Torch models and ONNX rewrites the evaluator tests run on (real exports, both exporters)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from toco_core.runtime import run_model

EXPORTERS: tuple[Literal["torchscript"], Literal["dynamo"]] = ("torchscript", "dynamo")


class MixNet(nn.Module):
    """BatchNorm, a depthwise conv, a residual Add, HardSwish, Concat and both Resize modes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
        self.pw = nn.Conv2d(8, 8, 1)
        self.side = nn.Conv2d(8, 4, 3, padding=2, dilation=2)
        self.bn_res = nn.BatchNorm2d(8)  # after an Add and a Concat: no conv to fold into
        self.bn_cat = nn.BatchNorm2d(12)
        self.down = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)                                # [N, 8, 14, 14]
        y = self.bn_res(y + self.pw(self.dw(y)))        # residual
        y = self.bn_cat(torch.cat([y, torch.sigmoid(self.side(y))], 1))  # [N, 12, 14, 14]
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)  # [N, 12, 28, 28]
        y = F.hardswish(self.down(y))                   # [N, 16, 14, 14]
        y = F.interpolate(y, scale_factor=0.5, mode="nearest")  # [N, 16, 7, 7]
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)      # [N, 16]
        return self.head(y)


class ReshapeBatchNet(nn.Module):
    """Conv, then a Reshape whose shape comes from Shape (dynamic batch), then BatchNorm1d on rank 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, stride=3)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)                                # [N, 4, 8, 8]
        y = y.reshape(x.shape[0], y.shape[1], -1)       # [N, 4, 64]
        y = torch.relu(self.bn(y))
        return self.fc(y.flatten(1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert m.running_mean is not None and m.running_var is not None  # track_running_stats
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def export(model: nn.Module, path: Path, exporter: str) -> onnx.ModelProto:
    """Export with a dynamic batch dimension (input [N, 1, 28, 28]) and load the result."""
    dummy = torch.rand(2, 1, 28, 28)
    kwargs: dict[str, Any] = dict(input_names=["image"], output_names=["logits"])
    if exporter == "dynamo":
        torch.onnx.export(model, (dummy,), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, **kwargs)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=17,
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, **kwargs)
    return onnx.load(str(path))


def initializers_to_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Paddle-style copy: every initializer becomes a Constant node at the top of the graph."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    consts = [
        helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in new.graph.initializer
    ]
    names = {t.name for t in new.graph.initializer}
    kept_inputs = [i for i in new.graph.input if i.name not in names]
    nodes = consts + list(new.graph.node)
    del new.graph.initializer[:]
    del new.graph.node[:]
    new.graph.node.extend(nodes)
    del new.graph.input[:]
    new.graph.input.extend(kept_inputs)
    onnx.checker.check_model(new)
    return new


def tiny_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    """A checked one-graph model from onnx.helper parts (initializers given as name -> array)."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)  # fills in the outputs' types
    onnx.checker.check_model(model)
    return model


def assert_matches_ort(model: onnx.ModelProto, ours: torch.Tensor, x: np.ndarray) -> float:
    """Check |ours - onnxruntime| <= 1e-4 max(1, max |ort|); returns the max abs difference."""
    ref = run_model(model, x)
    got = ours.detach().numpy()
    assert got.shape == ref.shape, f"shape {got.shape} != onnxruntime's {ref.shape}"
    assert got.dtype == ref.dtype, f"dtype {got.dtype} != onnxruntime's {ref.dtype}"
    diff = float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0
    bound = 1e-4 * max(1.0, float(np.abs(ref).max()) if ref.size else 0.0)
    assert diff <= bound, f"max abs diff {diff:.3g} > {bound:.3g}"
    return diff
