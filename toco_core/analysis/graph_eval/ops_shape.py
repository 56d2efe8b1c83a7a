"""Shape, layout and indexing ops, and the constant makers.

Shape returns a plain int64 tensor built from the (per-sample, under vmap) logical shape, so
Shape -> Gather -> Concat -> Reshape chains stay constant and never touch the data.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from toco_core.analysis.graph_eval.node import (
    OpNode,
    Value,
    arg,
    axes_arg,
    need,
    norm_axis,
    static_floats,
    static_ints,
    to_tensor,
)


def constant(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Constant: the tensor held by ``value`` (or value_float(s) / value_int(s))."""
    if "value" in node.attrs:
        return to_tensor(node.attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in node.attrs:
            return to_tensor(np.asarray(node.attrs[key], dtype=dtype))
    raise node.error(f"constant of kind {sorted(node.attrs)} is not supported", "use a dense numeric value")


def constant_of_shape(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """ConstantOfShape: a tensor of the given shape filled with ``value`` (default float32 0)."""
    shape = static_ints(node, need(node, inputs, 0), "the shape")
    fill = to_tensor(np.asarray(node.attr("value", np.zeros(1, np.float32))).reshape(-1))
    return torch.full(shape, fill[0].item(), dtype=fill.dtype)


def shape(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Shape: the dimensions [start:end] as int64 (Python slicing rules = ONNX's clamping)."""
    dims = list(need(node, inputs, 0).shape)[node.attr("start", 0) : node.attr("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


def size(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Size: the number of elements as an int64 scalar."""
    return torch.tensor(math.prod(need(node, inputs, 0).shape), dtype=torch.int64)


def reshape(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Reshape: 0 copies the input dimension (unless allowzero = 1), -1 is inferred."""
    x = need(node, inputs, 0)
    target = static_ints(node, need(node, inputs, 1), "the target shape")
    if not node.attr("allowzero", 0):
        target = [x.shape[i] if t == 0 else t for i, t in enumerate(target)]
    return x.reshape(target)


def flatten(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Flatten: [d0 ... d(axis-1)] x [d(axis) ...] -> 2-D; axis may be negative."""
    x = need(node, inputs, 0)
    axis = node.attr("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def transpose(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Transpose by ``perm`` (default: reverse the axes)."""
    x = need(node, inputs, 0)
    return x.permute(node.attr("perm", list(range(x.dim()))[::-1]))


def concat(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Concat along ``axis``."""
    ts = [t for t in inputs if t is not None]
    return torch.cat(ts, dim=norm_axis(node, node.attr("axis"), ts[0].dim()))


def split(node: OpNode, inputs: list[Value]) -> tuple[torch.Tensor, ...]:
    """Split along ``axis`` by sizes (input from opset 13, attribute before) or into equal parts.

    Equal parts: ceil(d / n) each, the last one smaller when d is not divisible (opset 18).
    """
    x = need(node, inputs, 0)
    axis = norm_axis(node, node.attr("axis", 0), x.dim())
    sizes_t = arg(inputs, 1)
    if node.opset >= 13 and sizes_t is not None:
        sizes = static_ints(node, sizes_t, "the split sizes")
    elif node.opset < 13 and "split" in node.attrs:
        sizes = list(node.attrs["split"])
    else:
        n = node.attr("num_outputs", len(node.outputs))
        part = -(-x.shape[axis] // n)
        sizes = [part] * (n - 1) + [x.shape[axis] - part * (n - 1)]
    return tuple(torch.split(x, sizes, dim=axis))


def squeeze(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Squeeze the given axes, or every axis of size 1 when none are given."""
    x = need(node, inputs, 0)
    axes = axes_arg(node, inputs, 13)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(norm_axis(node, a, x.dim()) for a in axes))


def unsqueeze(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Unsqueeze: insert size-1 axes at the given positions of the output."""
    x = need(node, inputs, 0)
    axes = axes_arg(node, inputs, 13)
    if axes is None:
        raise node.error("no axes given", "set the axes input or attribute")
    rank = x.dim() + len(axes)
    for a in sorted(norm_axis(node, a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


def slice_(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Slice with negative indices, steps (negative too) and ends clamped to the axis.

    Clamping: step > 0: start, end in [0, d]; step < 0: start in [0, d-1], end in [-1, d-1].
    """
    x = need(node, inputs, 0)
    if node.opset < 10:
        starts, ends = node.attr("starts"), node.attr("ends")
        axes, steps = node.attr("axes"), None
    else:
        starts = static_ints(node, need(node, inputs, 1), "the starts")
        ends = static_ints(node, need(node, inputs, 2), "the ends")
        axes = None if arg(inputs, 3) is None else static_ints(node, need(node, inputs, 3), "the axes")
        steps = None if arg(inputs, 4) is None else static_ints(node, need(node, inputs, 4), "the steps")
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = norm_axis(node, axis, x.dim())
        d = x.shape[axis]
        start, end = start + d if start < 0 else start, end + d if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), d), min(max(end, 0), d)
            x = x[(slice(None),) * axis + (slice(start, end, step),)]
        elif step < 0:
            start, end = min(max(start, 0), d - 1), min(max(end, -1), d - 1)
            x = x.index_select(axis, torch.arange(start, end, step, dtype=torch.int64))
        else:
            raise node.error("a step of 0", "use a non-zero step")
    return x


def gather(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Gather along ``axis``: out shape = x.shape[:axis] + indices.shape + x.shape[axis+1:]."""
    x, idx = need(node, inputs, 0), need(node, inputs, 1).long()
    axis = norm_axis(node, node.attr("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    picked = x.index_select(axis, idx.reshape(-1))
    return picked.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


def expand(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Expand: broadcast x against the given shape."""
    x = need(node, inputs, 0)
    target = static_ints(node, need(node, inputs, 1), "the shape")
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(target)))


def tile(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Tile: repeat x the given number of times along each axis."""
    return need(node, inputs, 0).repeat(static_ints(node, need(node, inputs, 1), "the repeats"))


def range_(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Range: start + i delta for i < max(ceil((limit - start) / delta), 0)."""
    start, limit, delta = (static_floats(node, need(node, inputs, i), "a Range bound")[0] for i in range(3))
    count = max(math.ceil((limit - start) / delta), 0)
    return (start + torch.arange(count, dtype=torch.float64) * delta).to(need(node, inputs, 0).dtype)


OPS = {
    "Constant": constant,
    "ConstantOfShape": constant_of_shape,
    "Shape": shape,
    "Size": size,
    "Reshape": reshape,
    "Flatten": flatten,
    "Transpose": transpose,
    "Concat": concat,
    "Split": split,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Slice": slice_,
    "Gather": gather,
    "Expand": expand,
    "Tile": tile,
    "Range": range_,
}
