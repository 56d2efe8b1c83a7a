"""Where a layer's output channels go: the route structured pruning must rewire to remove them.

Channels are followed from the layer through per-channel ops (activations, BatchNormalization,
Add/Sub/Mul/Div by a per-channel constant, MaxPool / AveragePool / global pools) and through
Flatten / Reshape to [N, C*H*W] (channel c -> the contiguous features [c*H*W, (c+1)*H*W)), to
readers that are Conv (group 1), Gemm (transA 0) or MatMul with a constant weight. Anything
else (a residual Add, Concat, a graph output, a shared weight...) makes the layer unsupported.

A ChannelRoute lists, per reader, the ops a removed channel's constant passes through (to fold
it into the reader's bias) and every constant that shrinks with the channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from toco_core.compression.graph_edit import GraphIndex, attr, static_shapes
from toco_core.onnx_model import compressible_weights

_UNARY = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu",
                    "Celu", "Softplus", "Softsign", "Gelu", "Mish", "Identity", "Dropout"})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "PRelu"})
_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool"})
_READERS = frozenset({"Conv", "Gemm", "MatMul"})


class Unsupported(Exception):
    """The channels of a layer cannot be followed to readers the surgery knows."""


@dataclass
class ChannelPath:
    """One way from the layer to a reader, and how the channel constant changes on it."""

    steps: list[tuple[Any, ...]]  # ("node", node, pos, rank, input index) or ("repeat", n): how the constant k changes
    reader: onnx.NodeProto
    block: int  # features per channel at the reader's input


@dataclass
class ChannelRoute:
    """Everything that moves when output channels of ``weight`` are removed."""

    layer: onnx.NodeProto
    weight: str
    out_axis: int
    channels: int
    paths: list[ChannelPath] = field(default_factory=list)
    shrinks: list[tuple[str, int, int]] = field(default_factory=list)  # (constant, axis, block)
    reshapes: list[tuple[str, int]] = field(default_factory=list)  # (shape constant, block)


def trace_route(g: GraphIndex, shapes: dict[str, tuple[int | None, ...]], weight: str) -> ChannelRoute:
    """The route of ``weight``'s output channels to their readers. Raises Unsupported where it cannot follow them."""
    uses = g.consumers(weight)
    if len(uses) != 1 or uses[0][1] != 1:
        raise Unsupported("the weight is shared or not a layer's weight input")
    node, w = uses[0][0], g.tensor(weight)
    if w is None:
        raise Unsupported("the weight is not a constant")
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and attr(node, "group", 1) == 1:
        out_axis, pos, rank = (0 if op == "Conv" else 1), 1, w.ndim
    elif op == "Gemm":
        out_axis, pos, rank = (0 if attr(node, "transB", 0) else 1), 1, 2
    elif op == "MatMul" and w.ndim == 2 and len(shapes.get(node.output[0], ())) >= 1:
        out_axis, rank = 1, len(shapes[node.output[0]])
        pos = rank - 1
    else:
        raise Unsupported(f"{op} node {node.name!r} (grouped, or output rank unknown)")
    route = ChannelRoute(node, weight, out_axis, int(w.shape[out_axis]))
    route.shrinks.append((weight, out_axis, 1))
    if len(node.input) > 2 and node.input[2]:
        bias = g.tensor(node.input[2])
        if bias is None or g.use_count(node.input[2]) != 1 or bias.size not in (1, route.channels):
            raise Unsupported(f"the bias of {node.name!r} is not a private per-channel constant")
    _follow(g, shapes, node.output[0], pos, rank, route.channels, 1, [], route)
    return route


def _need_const(g: GraphIndex, name: str, private: bool = True) -> np.ndarray:
    value = g.tensor(name)
    if value is None or (private and g.use_count(name) != 1):
        raise Unsupported(f"input {name!r} is not a private constant")
    return value


def _follow(g: GraphIndex, shapes: dict[str, tuple[int | None, ...]], tensor: str, pos: int, rank: int, feats: int,
            block: int, steps: list[tuple[Any, ...]], route: ChannelRoute) -> None:
    """Walk every reader of ``tensor`` (channel axis ``pos`` of ``rank``, ``feats`` = C*block)."""
    if g.is_graph_output(tensor):
        raise Unsupported(f"the channels reach the graph output {tensor!r}")
    for node, idx in g.consumers(tensor):
        op, nxt = node.op_type, (pos, rank, feats, block)
        if any(g.use_count(o) for o in node.output[1:]):
            raise Unsupported(f"{op} node {node.name!r} has a second output in use")
        if op in _READERS and idx == 0:
            route.paths.append(_reader(g, node, pos, rank, block, route, steps))
            continue
        if op in _UNARY and idx == 0:
            for name in node.input[1:]:
                if name:
                    _need_const(g, name, private=False)
            new_steps = steps + [("node", node, pos, rank, idx)]
        elif op in _BINARY:
            const = g.tensor(node.input[1 - idx])
            if const is None:
                raise Unsupported(f"{op} node {node.name!r} mixes the channels with tensor {node.input[1 - idx]!r}")
            axis = pos - (rank - const.ndim)
            if const.ndim > rank or any(d != 1 for i, d in enumerate(const.shape) if i != axis):
                raise Unsupported(f"{op} node {node.name!r} is not per-channel")
            if axis >= 0 and const.shape[axis] == feats:
                _need_const(g, node.input[1 - idx])
                route.shrinks.append((node.input[1 - idx], axis, block))
            new_steps = steps + [("node", node, pos, rank, idx)]
        elif op == "BatchNormalization" and idx == 0 and pos == 1:
            for name in node.input[1:5]:
                _need_const(g, name)
                route.shrinks.append((name, 0, block))
            new_steps = steps + [("node", node, pos, rank, idx)]
        elif op in _POOLS and idx == 0 and pos == 1 and block == 1:
            if op == "AveragePool" and attr(node, "count_include_pad", 0) and any(attr(node, "pads", [])):
                raise Unsupported(f"AveragePool {node.name!r} averages padding into the channel")
            new_steps = steps
        elif op in ("Flatten", "Reshape") and idx == 0 and pos == 1:
            nxt = _flatten(g, shapes, node, tensor, rank, feats, block, route)
            new_steps = steps + [("repeat", nxt[3] // block)]
        else:
            raise Unsupported(f"{op} node {node.name!r} reads the channels (input {idx})")
        _follow(g, shapes, node.output[0], *nxt, new_steps, route)


def _flatten(g: GraphIndex, shapes: dict[str, tuple[int | None, ...]], node: onnx.NodeProto, tensor: str, rank: int,
             feats: int, block: int, route: ChannelRoute) -> tuple[int, int, int, int]:
    """Channel c of [N, C, *S] -> features [c*prod(S), (c+1)*prod(S)) of [N, C*prod(S)]."""
    in_shape = shapes.get(tensor)
    if in_shape is None or any(d is None for d in in_shape[1:]):
        raise Unsupported(f"{node.op_type} {node.name!r}: input shape unknown")
    per_channel = int(np.prod([d for d in in_shape[2:] if d is not None], dtype=np.int64))
    total = feats * per_channel
    if node.op_type == "Flatten":
        if attr(node, "axis", 1) != 1:
            raise Unsupported(f"Flatten {node.name!r} does not flatten from axis 1")
    else:
        target = [int(s) for s in _need_const(g, node.input[1], private=False).reshape(-1)]
        if len(target) != 2 or target[1] not in (-1, total) or (target[1] == -1 and target[0] < 0):
            raise Unsupported(f"Reshape {node.name!r} is not [N, C*H*W]")
        if target[1] == total:
            _need_const(g, node.input[1])
            route.reshapes.append((node.input[1], block * per_channel))
    return 1, 2, total, block * per_channel


def _reader(g: GraphIndex, node: onnx.NodeProto, pos: int, rank: int, block: int, route: ChannelRoute,
            steps: list[tuple[Any, ...]]) -> ChannelPath:
    w = _need_const(g, node.input[1])
    if len(node.input) > 2 and node.input[2]:
        _need_const(g, node.input[2])
    if not (node.op_type == "Conv" and pos == 1 and block == 1 and attr(node, "group", 1) == 1
            or node.op_type == "Gemm" and rank == 2 and not attr(node, "transA", 0)
            or node.op_type == "MatMul" and w.ndim == 2 and pos == rank - 1):
        raise Unsupported(f"{node.op_type} {node.name!r} cannot drop input channels at axis {pos}")
    route.shrinks.append((node.input[1], reader_input_axis(node), block))
    return ChannelPath(list(steps), node, block)


def reader_input_axis(reader: onnx.NodeProto) -> int:
    """The axis of a reader's weight that runs over its input features: Conv 1, Gemm 1 with transB
    (else 0), MatMul 0."""
    if reader.op_type == "Conv":
        return 1
    return 1 if reader.op_type == "Gemm" and attr(reader, "transB", 0) else 0


def unread_channels(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Output channels no reader uses: every reader's weights on the channel's features are zero.

    Takes the model and its weights (ONNX name -> array; a reader's weight missing from it is read
    from the model). Returns, for every compressible weight, a bool mask over its output channels;
    layers whose route cannot be traced get all-False masks. Removing such a channel
    (structured.remove_output_channels) is exact whatever its values: what it carries is multiplied
    by zeros. Pruning makes them: a reader's whole input column pruned or rounded to zero.
    """
    g, shapes = GraphIndex(model), static_shapes(model)
    masks = {}
    for info in compressible_weights(model):
        try:
            masks[info.name] = unread_on_route(g, trace_route(g, shapes, info.name), weights)
        except Unsupported:
            masks[info.name] = np.zeros(info.shape[info.out_axis], dtype=bool)
    return masks


def unread_on_route(g: GraphIndex, route: ChannelRoute, weights: dict[str, np.ndarray]) -> np.ndarray:
    """unread_channels of one traced layer: a bool mask over ``route``'s channels (all False when a
    reader's weight does not have the features the route expects)."""
    unread = np.ones(route.channels, dtype=bool)
    for path in route.paths:
        name = path.reader.input[1]
        w = np.asarray(weights[name] if name in weights else g.tensor(name))
        axis = reader_input_axis(path.reader)
        read = np.moveaxis(w != 0, axis, 0).reshape(w.shape[axis], -1).any(axis=1)
        if read.size != route.channels * path.block:
            return np.zeros(route.channels, dtype=bool)
        unread &= ~read.reshape(route.channels, path.block).any(axis=1)
    return unread


def expand_features(mask: np.ndarray, block: int) -> np.ndarray:
    """Indices of the features of the masked channels, channel c -> [c*block, (c+1)*block)."""
    return (np.flatnonzero(mask)[:, None] * block + np.arange(block)[None, :]).reshape(-1)


def structured_support(model: onnx.ModelProto) -> dict[str, str | None]:
    """For every compressible weight: None if its output channels can be removed, else why not."""
    g, shapes = GraphIndex(model), static_shapes(model)
    out: dict[str, str | None] = {}
    for info in compressible_weights(model):
        try:
            trace_route(g, shapes, info.name)
            out[info.name] = None
        except Unsupported as exc:
            out[info.name] = str(exc)
    return out
