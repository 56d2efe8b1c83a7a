"""Activations and the softmax family, with ONNX's default attribute values."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from toco_core.analysis.graph_eval.node import Handler, OpNode, Value, arg, need, norm_axis


def relu(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Relu: max(x, 0)."""
    return torch.relu(need(node, inputs, 0))


def leaky_relu(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """LeakyRelu: x if x >= 0 else alpha x (alpha = 0.01)."""
    return F.leaky_relu(need(node, inputs, 0), node.attr("alpha", 0.01))


def prelu(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """PRelu: x if x >= 0 else slope x, slope broadcast to x."""
    x, slope = need(node, inputs, 0), need(node, inputs, 1)
    return torch.where(x >= 0, x, x * slope)


def elu(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Elu: x if x >= 0 else alpha (exp(x) - 1) (alpha = 1)."""
    return F.elu(need(node, inputs, 0), node.attr("alpha", 1.0))


def selu(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Selu: gamma (x if x > 0 else alpha (exp(x) - 1)) with ONNX's default alpha and gamma."""
    x = need(node, inputs, 0)
    alpha = node.attr("alpha", 1.67326319217681884765625)
    gamma: float = node.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


def sigmoid(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Sigmoid: 1 / (1 + exp(-x))."""
    return torch.sigmoid(need(node, inputs, 0))


def tanh(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Tanh."""
    return torch.tanh(need(node, inputs, 0))


def hard_sigmoid(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """HardSigmoid: max(0, min(1, alpha x + beta)) (alpha = 0.2, beta = 0.5)."""
    return torch.clamp(node.attr("alpha", 0.2) * need(node, inputs, 0) + node.attr("beta", 0.5), 0.0, 1.0)


def hard_swish(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """HardSwish: x max(0, min(1, x / 6 + 1 / 2))."""
    return F.hardswish(need(node, inputs, 0))


def softplus(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Softplus: log(1 + exp(x))."""
    return F.softplus(need(node, inputs, 0))


def softsign(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Softsign: x / (1 + |x|)."""
    return F.softsign(need(node, inputs, 0))


def gelu(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Gelu: x Phi(x), exact or with the tanh approximation."""
    return F.gelu(need(node, inputs, 0), approximate=node.attr("approximate", "none"))


def mish(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Mish: x tanh(softplus(x))."""
    return F.mish(need(node, inputs, 0))


def clip(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Clip: min(max(x, lo), hi); bounds are inputs (opset >= 11) or attributes, each optional."""
    x = need(node, inputs, 0)
    if node.opset < 11:
        lo, hi = node.attr("min", -math.inf), node.attr("max", math.inf)
        return torch.clamp(x, lo, hi)
    lo, hi = arg(inputs, 1), arg(inputs, 2)
    if lo is None and hi is None:
        return x
    return torch.clamp(x, min=lo, max=hi)


def _softmax_like(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Handler:
    def handler(node: OpNode, inputs: list[Value]) -> torch.Tensor:
        x = need(node, inputs, 0)
        if node.opset >= 13:
            return fn(x, norm_axis(node, node.attr("axis", -1), x.dim()))
        # opset < 13: flatten to 2-D at axis, normalise each row, restore the shape
        axis = norm_axis(node, node.attr("axis", 1), x.dim())
        rows = math.prod(x.shape[:axis])
        return fn(x.reshape(rows, -1), 1).reshape(x.shape)

    handler.__doc__ = (
        f"{fn.__name__} over ``axis`` (opset >= 13, default -1), or over the flattened "
        "trailing axes from ``axis`` on (opset < 13, default 1)."
    )
    return handler


OPS = {
    "Relu": relu,
    "LeakyRelu": leaky_relu,
    "PRelu": prelu,
    "Elu": elu,
    "Selu": selu,
    "Sigmoid": sigmoid,
    "Tanh": tanh,
    "HardSigmoid": hard_sigmoid,
    "HardSwish": hard_swish,
    "Softplus": softplus,
    "Softsign": softsign,
    "Gelu": gelu,
    "Mish": mish,
    "Clip": clip,
    "Softmax": _softmax_like(torch.softmax),
    "LogSoftmax": _softmax_like(torch.log_softmax),
}
