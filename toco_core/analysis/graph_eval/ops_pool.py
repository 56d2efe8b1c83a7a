"""Pooling: MaxPool, AveragePool (with count_include_pad, ceil_mode, auto_pad), global pools.

Both windowed pools pad explicitly (asymmetric pads and ceil_mode's overhang included) and
then pool without padding, so ONNX's output size rules hold exactly:
out = floor_or_ceil((in + pad_begin + pad_end - ((k - 1) d + 1)) / s) + 1, and in ceil mode a
last window that would start in the end padding is dropped (as onnxruntime does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from toco_core.analysis.graph_eval.node import OpNode, Value, need, spatial_pads, torch_pad_list

_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _geometry(
    node: OpNode, x: torch.Tensor
) -> tuple[list[int], list[int], list[int], list[tuple[int, int]], list[int]]:
    """kernel, strides, dilations, (begin, end) pads and the ceil-mode overhang per spatial axis."""
    n = x.dim() - 2
    if n not in _MAX:
        raise node.error(f"input of rank {x.dim()} is not supported", "use 1D, 2D or 3D pooling")
    kernel = list(node.attr("kernel_shape"))
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    # onnxruntime sizes SAME_* pool padding with the undilated kernel (unlike Conv); follow it,
    # since the compressed model runs there
    pads = spatial_pads(node, x.shape[2:], kernel, strides, [1] * n)
    ceil_mode = node.attr("ceil_mode", 0)
    overhang = []
    for size, (p0, p1), k, s, d in zip(x.shape[2:], pads, kernel, strides, dilations, strict=True):
        span = size + p0 + p1 - ((k - 1) * d + 1)
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= size + p0:
            out -= 1
        overhang.append(max((out - 1) * s + (k - 1) * d + 1 - (size + p0 + p1), 0))
    return kernel, strides, dilations, pads, overhang


def max_pool(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """MaxPool: the maximum over each window; padding never wins (it is -inf)."""
    if len(node.outputs) > 1 and node.outputs[1]:
        raise node.error("the Indices output is not supported", "export the model without pooling indices")
    x = need(node, inputs, 0)
    kernel, strides, dilations, pads, overhang = _geometry(node, x)
    padded = [(p0, p1 + o) for (p0, p1), o in zip(pads, overhang, strict=True)]
    x = F.pad(x, torch_pad_list(padded), value=-math.inf)
    return _MAX[len(kernel)](x, kernel, strides, 0, dilations)


def _window_sum(t: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> torch.Tensor:
    """Sum over each (dilated) window, per channel, without padding."""
    n = len(kernel)
    if all(d == 1 for d in dilations):
        return _AVG[n](t, kernel, strides) * math.prod(kernel)
    channels = t.shape[1]
    ones = torch.ones((channels, 1, *kernel), dtype=t.dtype)
    return _CONV[n](t, ones, None, strides, 0, dilations, channels)


def average_pool(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """AveragePool: window sum / window count.

    The count covers the real input, plus the declared pads when count_include_pad = 1;
    ceil_mode's overhang is never counted (onnxruntime's rule).
    """
    x = need(node, inputs, 0)
    kernel, strides, dilations, pads, overhang = _geometry(node, x)
    padded = [(p0, p1 + o) for (p0, p1), o in zip(pads, overhang, strict=True)]
    total = _window_sum(F.pad(x, torch_pad_list(padded)), kernel, strides, dilations)
    if node.attr("count_include_pad", 0):
        counted = [(0, o) for o in overhang]
        inner = [size + p0 + p1 for size, (p0, p1) in zip(x.shape[2:], pads, strict=True)]
    else:
        counted = [(p0, p1 + o) for (p0, p1), o in zip(pads, overhang, strict=True)]
        inner = list(x.shape[2:])
    mask = F.pad(torch.ones((1, 1, *inner), dtype=x.dtype), torch_pad_list(counted))
    return total / _window_sum(mask, kernel, strides, dilations)


def global_average_pool(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """GlobalAveragePool: mean over all spatial axes, kept as size 1."""
    x = need(node, inputs, 0)
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def global_max_pool(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """GlobalMaxPool: max over all spatial axes, kept as size 1."""
    x = need(node, inputs, 0)
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


OPS = {
    "MaxPool": max_pool,
    "AveragePool": average_pool,
    "GlobalAveragePool": global_average_pool,
    "GlobalMaxPool": global_max_pool,
}
