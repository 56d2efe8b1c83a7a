"""Element-wise arithmetic, comparisons, unary math, and the pass-through ops (Cast, Identity, Dropout).

All of them broadcast the numpy way, like ONNX.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce

import torch

from toco_core.analysis.graph_eval.node import Handler, OpNode, Value, need, torch_dtype


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Handler:
    def handler(node: OpNode, inputs: list[Value]) -> torch.Tensor:
        return fn(need(node, inputs, 0), need(node, inputs, 1))

    handler.__doc__ = f"Element-wise {fn.__name__} with broadcasting."
    return handler


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Handler:
    def handler(node: OpNode, inputs: list[Value]) -> torch.Tensor:
        return fn(need(node, inputs, 0))

    handler.__doc__ = f"Element-wise {fn.__name__}."
    return handler


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Handler:
    def handler(node: OpNode, inputs: list[Value]) -> torch.Tensor:
        return reduce(fn, [t for t in inputs if t is not None])

    handler.__doc__ = f"Element-wise {fn.__name__} over all inputs."
    return handler


def div(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Div: true division for floats; integer division truncates toward zero as in onnxruntime."""
    a, b = need(node, inputs, 0), need(node, inputs, 1)
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def pow_(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Pow: a ** b, with the type of the base (the exponent may be of another type)."""
    a, b = need(node, inputs, 0), need(node, inputs, 1)
    return torch.pow(a, b).to(a.dtype)


def mod(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Mod: sign of the divisor (fmod=0, Python's %) or of the dividend (fmod=1, C's fmod)."""
    a, b = need(node, inputs, 0), need(node, inputs, 1)
    return torch.fmod(a, b) if node.attr("fmod", 0) else torch.remainder(a, b)


def mean(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Mean: the element-wise average of all inputs."""
    ts = [t for t in inputs if t is not None]
    return reduce(torch.add, ts) / len(ts)


def where(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Where: condition ? X : Y, broadcast."""
    return torch.where(need(node, inputs, 0), need(node, inputs, 1), need(node, inputs, 2))


def cast(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Cast to the element type in ``to`` (differentiable between float types)."""
    return need(node, inputs, 0).to(torch_dtype(node, node.attr("to")))


def cast_like(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """CastLike: cast the first input to the type of the second."""
    return need(node, inputs, 0).to(need(node, inputs, 1).dtype)


def identity(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Identity."""
    return need(node, inputs, 0)


def dropout(node: OpNode, inputs: list[Value]) -> tuple[torch.Tensor, ...]:
    """Dropout in inference mode: the input unchanged, and an all-true mask when asked for."""
    x = need(node, inputs, 0)
    if len(node.outputs) > 1:
        return x, torch.ones(x.shape, dtype=torch.bool)
    return (x,)


OPS = {
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": div,
    "Pow": pow_,
    "Mod": mod,
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Not": _unary(torch.logical_not),
    "Where": where,
    "Sum": _variadic(torch.add),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Mean": mean,
    "Sqrt": _unary(torch.sqrt),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),  # both round half to even
    "Sign": _unary(torch.sign),
    "Erf": _unary(torch.erf),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Cast": cast,
    "CastLike": cast_like,
    "Identity": identity,
    "Dropout": dropout,
}
