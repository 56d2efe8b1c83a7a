"""Normalisation in inference mode (BatchNormalization, LayerNormalization, InstanceNormalization)
and the Reduce*/Arg* family."""

from __future__ import annotations

from collections.abc import Callable

import torch

from toco_core.analysis.graph_eval.node import OpNode, Value, arg, axes_arg, need, norm_axis


def _per_channel(p: torch.Tensor, rank: int) -> torch.Tensor:
    """[C] -> [C, 1, ..., 1] so it broadcasts against [N, C, d1, ...] of any rank >= 2."""
    return p.reshape(-1, *([1] * (rank - 2)))


def batch_normalization(node: OpNode, inputs: list[Value]) -> tuple[torch.Tensor, ...]:
    """BatchNormalization, always in inference mode, for inputs of any rank >= 2.

    y = (x - mean) / sqrt(var + epsilon) * scale + B, the parameters along axis 1. When the
    node asks for the running statistics too, they are passed through unchanged.
    """
    x, scale, bias, mean, var = (need(node, inputs, i) for i in range(5))
    r = x.dim()
    eps = node.attr("epsilon", 1e-5)
    y = (x - _per_channel(mean, r)) * _per_channel(scale / torch.sqrt(var + eps), r) + _per_channel(bias, r)
    return (y, mean, var)[: len(node.outputs)]


def layer_normalization(node: OpNode, inputs: list[Value]) -> tuple[torch.Tensor, ...]:
    """LayerNormalization over the axes from ``axis`` on: (x - mu) / sqrt(sigma^2 + eps) * scale + B.

    The optional Mean and InvStdDev outputs keep the reduced axes as size 1.
    """
    x, scale, bias = need(node, inputs, 0), need(node, inputs, 1), arg(inputs, 2)
    axis = norm_axis(node, node.attr("axis", -1), x.dim())
    dims = tuple(range(axis, x.dim()))
    mu = x.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(((x - mu) ** 2).mean(dim=dims, keepdim=True) + node.attr("epsilon", 1e-5))
    y = (x - mu) * inv_std * scale
    if bias is not None:
        y = y + bias
    return (y, mu, inv_std)[: len(node.outputs)]


def instance_normalization(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """InstanceNormalization: per sample and channel over the spatial axes, then scale and B."""
    x, scale, bias = (need(node, inputs, i) for i in range(3))
    dims = tuple(range(2, x.dim()))
    mu = x.mean(dim=dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
    r = x.dim()
    y = (x - mu) * torch.rsqrt(var + node.attr("epsilon", 1e-5))
    return y * _per_channel(scale, r) + _per_channel(bias, r)


def _prod(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


_REDUCERS: dict[str, tuple[Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor], int]] = {
    # op type: (function(x, dims, keepdim), first opset with axes as an input)
    "ReduceMean": (lambda x, d, k: x.mean(dim=d, keepdim=k), 18),
    "ReduceSum": (lambda x, d, k: x.sum(dim=d, keepdim=k), 13),
    "ReduceMax": (lambda x, d, k: x.amax(dim=d, keepdim=k), 18),
    "ReduceMin": (lambda x, d, k: x.amin(dim=d, keepdim=k), 18),
    "ReduceProd": (_prod, 18),
    "ReduceSumSquare": (lambda x, d, k: (x * x).sum(dim=d, keepdim=k), 18),
    "ReduceL1": (lambda x, d, k: x.abs().sum(dim=d, keepdim=k), 18),
    "ReduceL2": (lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k)), 18),
    "ReduceLogSumExp": (lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k), 18),
}


def reduce(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Reduce* over ``axes`` (attribute, or input from opset 13/18), keepdims default 1.

    No axes: reduce over all axes, or return the input when noop_with_empty_axes = 1.
    """
    fn, since = _REDUCERS[node.op_type]
    x = need(node, inputs, 0)
    axes = axes_arg(node, inputs, since)
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    dims = tuple(sorted({norm_axis(node, a, x.dim()) for a in axes}))
    return fn(x, dims, bool(node.attr("keepdims", 1)))


def arg_extreme(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """ArgMax / ArgMin along ``axis`` (int64, keepdims default 1, first or last index on ties)."""
    x = need(node, inputs, 0)
    axis = norm_axis(node, node.attr("axis", 0), x.dim())
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    keep = bool(node.attr("keepdims", 1))
    if node.attr("select_last_index", 0):
        return x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
    return fn(x, dim=axis, keepdim=keep)


OPS = {
    "BatchNormalization": batch_normalization,
    "LayerNormalization": layer_normalization,
    "InstanceNormalization": instance_normalization,
    "ArgMax": arg_extreme,
    "ArgMin": arg_extreme,
    **{op: reduce for op in _REDUCERS},
}
