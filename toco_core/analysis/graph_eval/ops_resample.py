"""Pad and Resize, both as index arithmetic on known shapes (so they work under vmap).

Resize is separable: each resized axis maps output index i to a source coordinate c(i)
(coordinate_transformation_mode), then takes the nearest sample or interpolates linearly
between floor(c) and floor(c) + 1 (indices clamped to the axis, as onnxruntime does).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from toco_core.analysis.graph_eval.node import (
    OpNode,
    Value,
    arg,
    need,
    norm_axis,
    static_floats,
    static_ints,
    torch_pad_list,
)


def _pad_index(mode: str, d: int, begin: int, end: int) -> np.ndarray:
    """Source index of each output position j in [-begin, d + end) for edge/reflect/wrap padding."""
    j = np.arange(-begin, d + end)
    if mode == "edge":
        return np.clip(j, 0, d - 1)
    if mode == "wrap":
        return np.mod(j, d)
    if d == 1:  # reflect of a single element repeats it
        return np.zeros_like(j)
    m = np.mod(j, 2 * (d - 1))
    return np.where(m >= d, 2 * (d - 1) - m, m)


def pad(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Pad in mode constant (value), reflect, edge or wrap; negative pads crop.

    pads = [begin_0, ..., begin_k, end_0, ..., end_k] over ``axes`` (opset 18) or all axes;
    pads are an attribute before opset 11, an input from 11 on.
    """
    x = need(node, inputs, 0)
    mode = node.attr("mode", "constant")
    if node.opset < 11:
        pads, value, axes = list(node.attr("pads")), float(node.attr("value", 0.0)), None
    else:
        pads = static_ints(node, need(node, inputs, 1), "the pads")
        cv = arg(inputs, 2)
        value = static_floats(node, cv, "the pad value")[0] if cv is not None and cv.numel() else 0.0
        axes_t = arg(inputs, 3)
        axes = None if axes_t is None else static_ints(node, axes_t, "the axes")
    axes = list(range(x.dim())) if axes is None else [norm_axis(node, a, x.dim()) for a in axes]
    n = len(axes)
    pairs = {a: (pads[i], pads[i + n]) for i, a in enumerate(axes)}
    if mode == "constant":
        return F.pad(x, torch_pad_list([pairs.get(a, (0, 0)) for a in range(x.dim())]), value=value)
    if mode not in ("edge", "reflect", "wrap"):
        raise node.error(f"mode {mode!r} is unknown", "use constant, reflect, edge or wrap")
    for a, (begin, end) in pairs.items():
        if begin or end:
            x = x.index_select(a, torch.as_tensor(_pad_index(mode, x.shape[a], begin, end)))
    return x


def _source_coords(node: OpNode, mode: str, out: int, size: int, scale: float) -> NDArray[np.float32]:
    """c(i) for i < out in float32 (onnxruntime's precision), by coordinate_transformation_mode."""
    i = np.arange(out, dtype=np.float32)
    s = np.float32(scale)
    if mode == "half_pixel":
        return (i + 0.5) / s - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / s - 0.5 if out > 1 else np.zeros(out, np.float32)
    if mode == "align_corners":
        return i * np.float32(size - 1) / np.float32(out - 1) if out > 1 else np.zeros(out, np.float32)
    if mode == "asymmetric":
        return i / s
    if mode == "half_pixel_symmetric":
        adjust = np.float32(out) / (s * np.float32(size))
        offset = np.float32(size) / 2 * (1 - adjust)
        return offset + (i + 0.5) / s - 0.5
    raise node.error(f"coordinate_transformation_mode {mode!r} is not supported", "see docs/ops.md")


def _nearest(node: OpNode, c: NDArray[np.float32]) -> NDArray[np.float32]:
    rule = node.attr("nearest_mode", "round_prefer_floor")
    rounded: NDArray[np.float32]
    if rule == "round_prefer_floor":
        rounded = np.ceil(c - 0.5)
    elif rule == "round_prefer_ceil":
        rounded = np.floor(c + 0.5)
    elif rule == "floor":
        rounded = np.floor(c)
    elif rule == "ceil":
        rounded = np.ceil(c)
    else:
        raise node.error(f"nearest_mode {rule!r} is unknown", "use round_prefer_floor/ceil, floor or ceil")
    return rounded


def _resize_axis(node: OpNode, x: torch.Tensor, axis: int, out: int, scale: float) -> torch.Tensor:
    size = x.shape[axis]
    c = _source_coords(node, node.attr("coordinate_transformation_mode", "half_pixel"), out, size, scale)
    if node.attr("mode", "nearest") == "nearest":
        idx = np.clip(_nearest(node, c), 0, size - 1).astype(np.int64)
        return x.index_select(axis, torch.as_tensor(idx))
    lo = np.floor(c)
    w = torch.as_tensor(c - lo, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - axis - 1)))
    i0 = torch.as_tensor(np.clip(lo, 0, size - 1).astype(np.int64))
    i1 = torch.as_tensor(np.clip(lo + 1, 0, size - 1).astype(np.int64))
    return x.index_select(axis, i0) * (1 - w) + x.index_select(axis, i1) * w


def _targets(node: OpNode, x: torch.Tensor, inputs: list[Value], axes: list[int]) -> tuple[list[int], list[float]]:
    """Output size and scale per resized axis, from ``sizes`` (with keep_aspect_ratio_policy) or ``scales``."""
    scales_t: Value
    sizes_t: Value
    if node.opset < 11:
        scales_t, sizes_t = need(node, inputs, 1), None
    else:
        scales_t, sizes_t = arg(inputs, 2), arg(inputs, 3)
    in_sizes = [x.shape[a] for a in axes]
    if sizes_t is not None and sizes_t.numel():
        sizes = static_ints(node, sizes_t, "the sizes")
        policy = node.attr("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            return sizes, [o / i for o, i in zip(sizes, in_sizes, strict=True)]
        pick = min if policy == "not_larger" else max
        s = pick(o / i for o, i in zip(sizes, in_sizes, strict=True))
        return [int(math.floor(s * i + 0.5)) for i in in_sizes], [s] * len(axes)
    if scales_t is None or not scales_t.numel():
        raise node.error("neither scales nor sizes are given", "give one of them")
    scales = static_floats(node, scales_t, "the scales")
    return [int(math.floor(i * s)) for i, s in zip(in_sizes, scales, strict=True)], scales


def resize(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Resize (nearest or linear) by scales or sizes; out = floor(in * scale) with scales.

    Not supported (ModelError): cubic, antialias, tf_crop_and_resize.
    """
    x = need(node, inputs, 0)
    if node.attr("mode", "nearest") not in ("nearest", "linear") or node.attr("antialias", 0):
        raise node.error(f"mode {node.attr('mode')!r} with antialias={node.attr('antialias', 0)} is not supported",
                         "use nearest or linear without antialias")
    axes = [norm_axis(node, a, x.dim()) for a in node.attr("axes", range(x.dim()))]
    outs, scales = _targets(node, x, inputs, axes)
    for axis, out, scale in zip(axes, outs, scales, strict=True):
        if out != x.shape[axis] or scale != 1.0:
            x = _resize_axis(node, x, axis, out, scale)
    return x


OPS = {"Pad": pad, "Resize": resize}
