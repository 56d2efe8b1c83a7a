"""The weight-carrying ops: Conv, ConvTranspose, Gemm, MatMul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toco_core.analysis.graph_eval.node import OpNode, Value, arg, need, spatial_pads, torch_pad_list

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _spatial_rank(node: OpNode, w: torch.Tensor) -> int:
    n = w.dim() - 2
    if n not in _CONV:
        raise node.error(f"weight of rank {w.dim()} is not supported", "use 1D, 2D or 3D convolutions")
    return n


def conv(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Conv: y = x * w + b with groups, strides, dilations, explicit or automatic padding.

    Asymmetric padding (SAME_* with an odd total, or unequal pads) is applied by ``F.pad``
    before a padding-free convolution, since torch pads both sides alike.
    """
    x, w, b = need(node, inputs, 0), need(node, inputs, 1), arg(inputs, 2)
    n = _spatial_rank(node, w)
    kernel = list(node.attr("kernel_shape", w.shape[2:]))
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    pads = spatial_pads(node, x.shape[2:], kernel, strides, dilations)
    if all(p0 == p1 for p0, p1 in pads):
        padding = [p0 for p0, _ in pads]
    else:
        x, padding = F.pad(x, torch_pad_list(pads)), [0] * n
    return _CONV[n](x, w, b, strides, padding, dilations, node.attr("group", 1))


def _transpose_pads(node: OpNode, full: list[int], in_sizes: list[int], strides: list[int]) -> list[tuple[int, int]]:
    """(begin, end) crop of the full transposed output, after ONNX's ConvTranspose rules.

    With ``output_shape`` (or SAME_*, where output = in * stride) the total crop is
    full - output; SAME_UPPER puts the odd pixel at the end, otherwise at the beginning.
    """
    n = len(full)
    auto = node.attr("auto_pad", "NOTSET")
    target = node.attr("output_shape")
    if target is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        target = [i * s for i, s in zip(in_sizes, strides, strict=True)]
    if target is not None:
        target = list(target)[-n:]
        out = []
        for f, t in zip(full, target, strict=True):
            total = f - t
            small, big = total // 2, total - total // 2
            out.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return out
    if auto == "VALID":
        return [(0, 0)] * n
    pads = list(node.attr("pads", [0] * (2 * n)))
    return [(pads[i], pads[i + n]) for i in range(n)]


def conv_transpose(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """ConvTranspose: the padding-free transposed convolution, then ONNX's crop and output_padding.

    Full size per axis: (in - 1) s + (k - 1) d + 1 + output_padding; the crop comes from
    ``pads``, ``output_shape`` or ``auto_pad``. The bias is added after cropping.
    """
    x, w, b = need(node, inputs, 0), need(node, inputs, 1), arg(inputs, 2)
    n = _spatial_rank(node, w)
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    out_pad = list(node.attr("output_padding", [0] * n))
    in_sizes = list(x.shape[2:])
    kernel = list(w.shape[2:])
    full = [(i - 1) * s + (k - 1) * d + 1 + p
            for i, s, k, d, p in zip(in_sizes, strides, kernel, dilations, out_pad, strict=True)]
    crops = _transpose_pads(node, full, in_sizes, strides)
    y = _CONV_T[n](x, w, None, strides, 0, 0, node.attr("group", 1), dilations)
    # output_padding appends zeros at the end; negative F.pad values crop.
    y = F.pad(y, torch_pad_list([(-c0, p - c1) for (c0, c1), p in zip(crops, out_pad, strict=True)]))
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * n))
    return y


def gemm(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """Gemm: Y = alpha op(A) op(B) + beta C, op = transpose when transA/transB; C broadcasts."""
    a, b, c = need(node, inputs, 0), need(node, inputs, 1), arg(inputs, 2)
    if node.attr("transA", 0):
        a = a.transpose(0, 1)
    if node.attr("transB", 0):
        b = b.transpose(0, 1)
    y = a @ b
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    if alpha != 1.0:
        y = alpha * y
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return y


def matmul(node: OpNode, inputs: list[Value]) -> torch.Tensor:
    """MatMul with numpy semantics (batched, 1-D operands promoted and squeezed)."""
    return torch.matmul(need(node, inputs, 0), need(node, inputs, 1))


OPS = {"Conv": conv, "ConvTranspose": conv_transpose, "Gemm": gemm, "MatMul": matmul}
