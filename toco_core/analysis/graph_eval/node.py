"""One ONNX node as the op handlers see it, and the helpers they share.

Handlers get static values (shapes, axes, pads) as Python ints. Such values must be
*constant* tensors: initializers, Constants, or results of Shape arithmetic on them. A
tensor derived from the input data (batched under ``torch.func.vmap``) cannot become a
Python int, and ``static_ints`` says so instead of tracing a wrong graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from toco_core.errors import ModelError

Value = torch.Tensor | None
Handler = Callable[["OpNode", list[Value]], "torch.Tensor | Sequence[torch.Tensor]"]


@dataclass(frozen=True)
class OpNode:
    """An ONNX node: op type, a name for messages, input/output names, parsed attributes, opset."""

    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 17

    @classmethod
    def from_proto(cls, node: onnx.NodeProto, index: int, opset: int) -> OpNode:
        """Wrap a NodeProto; an unnamed node is called ``<op_type>#<index>`` in messages."""
        attrs = {a.name: _attr_value(a) for a in node.attribute}
        return cls(
            op_type=node.op_type,
            name=node.name or f"{node.op_type}#{index}",
            inputs=tuple(node.input),
            outputs=tuple(node.output),
            attrs=attrs,
            opset=opset,
        )

    def attr(self, key: str, default: Any = None) -> Any:
        """The attribute ``key``, or ``default`` when the node does not set it."""
        return self.attrs.get(key, default)

    def error(self, what: str, hint: str = "see docs/ops.md for what the evaluator supports") -> ModelError:
        """A ModelError naming this node; the caller raises it."""
        return ModelError(f"{self.op_type} node {self.name!r}: {what}", hint)


def _attr_value(attr: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8") for v in value]
    return value


def arg(inputs: list[Value], i: int) -> Value:
    """Input ``i``, or None when it is omitted (empty name) or past the end."""
    return inputs[i] if i < len(inputs) else None


def need(node: OpNode, inputs: list[Value], i: int) -> torch.Tensor:
    """Input ``i``, which the op requires; raises ModelError when the model omits it."""
    value = arg(inputs, i)
    if value is None:
        raise node.error(f"required input {i} is missing", "give the node all its required inputs")
    return value


def static_ints(node: OpNode, value: torch.Tensor, what: str) -> list[int]:
    """The values of a constant integer tensor as a flat list of ints.

    Raises ModelError when the tensor depends on the input data (e.g. a batched tensor
    under vmap), since the graph's shapes must be known without looking at the data.
    """
    try:
        return [int(v) for v in value.detach().reshape(-1).tolist()]
    except (RuntimeError, ValueError) as exc:
        raise node.error(
            f"{what} depends on the input data ({exc})",
            "the evaluator needs shapes, axes and pads that are constant or computed from Shape",
        ) from exc


def static_floats(node: OpNode, value: torch.Tensor, what: str) -> list[float]:
    """Like ``static_ints`` for float values (scales, pad values)."""
    try:
        return [float(v) for v in value.detach().reshape(-1).tolist()]
    except (RuntimeError, ValueError) as exc:
        raise node.error(f"{what} depends on the input data ({exc})", "make it a constant") from exc


def axes_arg(node: OpNode, inputs: list[Value], since: int) -> list[int] | None:
    """Axes from the second input (opset >= ``since``) or the ``axes`` attribute; None when absent."""
    if node.opset >= since:
        t = arg(inputs, 1)
        return None if t is None else static_ints(node, t, "the axes")
    axes = node.attr("axes")
    return None if axes is None else list(axes)


def norm_axis(node: OpNode, axis: int, rank: int) -> int:
    """Map a possibly negative axis into [0, rank); raises ModelError when out of range."""
    if not -rank <= axis < rank:
        raise node.error(f"axis {axis} is out of range for a rank-{rank} tensor", "fix the model's axis")
    return axis % rank


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch tensor owning a copy of a numeric ``array`` (dtype kept).

    Raises ModelError for strings and other non-numeric arrays.
    """
    if array.dtype.kind not in "biuf":
        raise ModelError(f"a constant tensor of dtype {array.dtype} is not supported", "use numeric tensors")
    return torch.from_numpy(np.array(array, copy=True))


# ONNX TensorProto element type -> torch dtype, for Cast and ConstantOfShape.
TORCH_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
}


def torch_dtype(node: OpNode, onnx_type: int) -> torch.dtype:
    """The torch dtype of an ONNX element type; raises ModelError for strings and exotic types."""
    if onnx_type not in TORCH_DTYPES:
        name = onnx.TensorProto.DataType.Name(onnx_type)
        raise node.error(f"element type {name} is not supported", "use a float or integer type")
    return TORCH_DTYPES[onnx_type]


def spatial_pads(
    node: OpNode, in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis of Conv and the pools, from ``pads`` or ``auto_pad``.

    SAME_*: out = ceil(in / s), total = max((out - 1) s + (k - 1) d + 1 - in, 0); SAME_UPPER
    puts the odd pixel at the end, SAME_LOWER at the beginning. VALID pads nothing.
    """
    n = len(in_sizes)
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = list(node.attr("pads", [0] * (2 * n)))
        if len(pads) != 2 * n:
            raise node.error(f"pads {pads} should hold {2 * n} values", "fix the model's pads")
        return [(pads[i], pads[i + n]) for i in range(n)]
    if auto == "VALID":
        return [(0, 0)] * n
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise node.error(f"auto_pad {auto!r} is unknown", "use NOTSET, VALID, SAME_UPPER or SAME_LOWER")
    out = []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        out.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return out


def torch_pad_list(pads: Sequence[tuple[int, int]]) -> list[int]:
    """ONNX-order (begin, end) pairs of the trailing axes -> ``F.pad``'s last-axis-first list."""
    flat: list[int] = []
    for begin, end in reversed(pads):
        flat += [begin, end]
    return flat
