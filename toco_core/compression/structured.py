"""Structured pruning: really remove output channels whose weights are all within tolerance.

Removing output channel c of a layer means: the layer computes one channel less, and every
reader of that channel is shrunk (the next Conv's input channels, the next Gemm/MatMul's rows).
The result equals the model in which channel c's weights are set to zero: such a channel
carries a constant, k_c = activation(bias_c) after whatever per-channel ops follow, and that
constant's contribution is folded into the reader's bias:

    Gemm/MatMul reader (weight B, rows of channel c):  bias += sum_{k in c} k_c * B[k, :]   (exact)
    Conv reader (weight W):                            bias += sum_c k_c * sum_{h,w} W[:, c, h, w]

The Conv fold is exact when the reader Conv has no padding; with padding, outputs whose window
overlaps the border saw zeros instead of k_c, so the fold is approximate there (exact again
when k_c = 0, e.g. a Relu after a negative bias). A build only removes what dead_channels offers,
which keeps such channels: a build's removal is exact.

Which layers qualify and what moves with their channels: toco_core.compression.channel_routes.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator

from toco_core.compression.channel_routes import (
    ChannelPath,
    ChannelRoute,
    Unsupported,
    expand_features,
    structured_support,
    trace_route,
    unread_on_route,
)
from toco_core.compression.graph_edit import GraphIndex, attr, clear_value_info, replace_nodes, set_attr, static_shapes
from toco_core.errors import ModelError
from toco_core.onnx_model import compressible_weights

__all__ = ["dead_channels", "remove_output_channels", "removable_channels", "structured_support"]


def removable_channels(model: onnx.ModelProto, weights: dict[str, np.ndarray],
                       tau: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Output channels that may be removed: all weights within tolerance and surgery supported.

    Takes the model, its weights (ONNX name -> array) and tolerances of the weights' shapes.
    Returns name -> bool mask over the output channels (WeightInfo.out_axis); a channel is
    marked when |w| <= tau for every weight of it. At least one channel per layer is kept
    (the one with the largest L1 norm). Layers the surgery cannot rewire get all-False masks.
    Raises ModelError for an unknown weight name or a tau of the wrong shape.
    """
    infos = {w.name: w for w in compressible_weights(model)}
    support = structured_support(model)
    masks = {}
    for name, t in tau.items():
        if name not in infos or name not in weights:
            raise ModelError(f"weight {name!r} is not a compressible weight of the model", "use its ONNX name")
        w, info = np.asarray(weights[name]), infos[name]
        if np.shape(t) != w.shape:
            raise ModelError(f"tau for {name!r} has shape {np.shape(t)}, weight {w.shape}", "pass per-weight tau")
        ok = np.moveaxis(np.abs(w) <= t, info.out_axis, 0).reshape(w.shape[info.out_axis], -1).all(axis=1)
        if support[name] is not None:
            ok[:] = False
        if ok.all():
            ok[np.argmax(np.abs(np.moveaxis(w, info.out_axis, 0)).reshape(len(ok), -1).sum(axis=1))] = False
        masks[name] = ok
    return masks


def dead_channels(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Output channels a compressed model can lose, exactly: all their weights zero (their constant
    output is folded into the readers, see the module doc; kept where a padded Conv reader would see
    a non-zero constant) or no reader using them (channel_routes.unread_channels).

    Takes the model and its compressed weights (ONNX name -> array). Returns name -> bool mask over
    the output channels of every given weight, at least one channel of every layer kept (the one
    with the largest L1 norm); layers the surgery cannot rewire get all-False masks. Each layer's
    route is traced once for both kinds. Raises ModelError for a name that is not a compressible weight.
    """
    infos = {w.name: w for w in compressible_weights(model)}
    unknown = sorted(set(weights) - set(infos))
    if unknown:
        raise ModelError(f"weight {unknown[0]!r} is not a compressible weight of the model", "use its ONNX name")
    g, shapes = GraphIndex(model), static_shapes(model)
    opset = _opset(model)
    masks = {}
    for name, w in weights.items():
        info = infos[name]
        try:
            route = trace_route(g, shapes, name)
        except Unsupported:
            masks[name] = np.zeros(info.shape[info.out_axis], dtype=bool)
            continue
        rows = np.abs(np.moveaxis(np.asarray(w), info.out_axis, 0)).reshape(route.channels, -1)
        zero = ~rows.any(axis=1)
        if zero.any():  # a removal must stay exact: not where a padded Conv would see the constant
            zero &= ~_border_constants(_Work(g), opset, route)
        drop = zero | unread_on_route(g, route, weights)
        if drop.all():
            drop[np.argmax(rows.sum(axis=1))] = False
        masks[name] = drop
    return masks


class _Work:
    """Working copies of the constants being edited (float64 for float tensors), written back once."""

    def __init__(self, g: GraphIndex) -> None:
        self.g = g
        self.arrays: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype[Any]] = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            value = self.g.tensor(name)
            assert value is not None, f"{name} was checked to be a constant"
            self.dtypes[name] = value.dtype
            self.arrays[name] = value.astype(np.float64) if value.dtype.kind == "f" else value.copy()
        result: np.ndarray = self.arrays[name]
        return result

    def as_stored(self, name: str) -> np.ndarray:
        return self.get(name).astype(self.dtypes[name])

    def new(self, hint: str, value: np.ndarray) -> str:
        name = self.g.add_initializer(hint, value.astype(np.float32))
        self.arrays[name], self.dtypes[name] = value.astype(np.float64), np.dtype(np.float32)
        return name

    def write(self) -> None:
        for name, value in self.arrays.items():
            self.g.set_tensor(name, value.astype(self.dtypes[name]))


def _layer_constant(work: _Work, route: ChannelRoute) -> np.ndarray:
    """k for every channel of the layer once its weights are zero: bias (beta * C for Gemm) or 0."""
    node = route.layer
    if len(node.input) > 2 and node.input[2]:
        bias = np.broadcast_to(work.get(node.input[2]).reshape(-1), (route.channels,)).copy()
        return bias * (attr(node, "beta", 1.0) if node.op_type == "Gemm" else 1.0)
    return np.zeros(route.channels)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _padded(node: onnx.NodeProto) -> bool:
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    return node.op_type == "Conv" and (any(attr(node, "pads", [0])) or auto not in ("NOTSET", "VALID"))


def _border_constants(work: _Work, opset: int, route: ChannelRoute) -> np.ndarray:
    """Channels whose constant (once their weights are zero) reaches a padded Conv reader non-zero:
    folding it into that reader's bias would be wrong at the border (module doc), so they stay.
    Exact folds (k = 0, unpadded Conv, Gemm/MatMul readers) are not flagged."""
    out = np.zeros(route.channels, dtype=bool)
    padded = [p for p in route.paths if _padded(p.reader)]
    if not padded:
        return out
    base = _layer_constant(work, route)
    for path in padded:
        k = base
        for step in path.steps:
            k = _apply_step(work, opset, step, k)
        out |= (k.reshape(route.channels, -1) != 0).any(axis=1)
    return out


def _apply_step(work: _Work, opset: int, step: tuple[Any, ...], k: np.ndarray) -> np.ndarray:
    """Push the per-feature constants ``k`` through one op with onnx's reference evaluator."""
    if step[0] == "repeat":
        return np.repeat(k, step[1])
    _, node, pos, rank, idx = step
    shape = [1] * rank
    shape[pos] = len(k)
    feeds: dict[str, np.ndarray] = {}
    names: list[str] = []
    for i, name in enumerate(node.input):
        names.append(f"in{i}" if name else "")
        if name:
            feeds[f"in{i}"] = k.reshape(shape).astype(np.float32) if i == idx else work.as_stored(name)
    probe = helper.make_node(node.op_type, names, ["out"], domain=node.domain)
    probe.attribute.extend(node.attribute)
    outs = ReferenceEvaluator(probe, opsets={"": opset}).run(None, feeds)
    assert isinstance(outs, list)
    out = outs[0]
    return np.asarray(out, dtype=np.float64).reshape(-1)


def _fold(g: GraphIndex, work: _Work, path: ChannelPath, k: np.ndarray, mask: np.ndarray,
          pending: list[tuple[str, np.ndarray, str]]) -> None:
    """Add the removed features' constant contribution to the reader's bias (see module doc)."""
    node, feats = path.reader, expand_features(mask, path.block)
    kd = k[feats]
    if not np.any(kd):
        return
    w = work.get(node.input[1])
    if node.op_type == "Conv":
        contrib = w[:, feats].reshape(w.shape[0], len(feats), -1).sum(axis=2) @ kd
    elif node.op_type == "Gemm":
        contrib = attr(node, "alpha", 1.0) * (w[:, feats] @ kd if attr(node, "transB", 0) else kd @ w[feats, :])
    else:
        contrib = kd @ w[feats, :]
    if node.op_type in ("Conv", "Gemm"):
        if len(node.input) > 2 and node.input[2]:
            name = node.input[2]
            if node.op_type == "Gemm":
                work.arrays[name] = work.get(name) * attr(node, "beta", 1.0)
                set_attr(node, "beta", 1.0)
            work.arrays[name] = work.get(name) + contrib
        else:
            name = work.new(f"{node.name or node.op_type}_folded_bias", contrib)
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name
            if node.op_type == "Gemm":
                set_attr(node, "beta", 1.0)
        return
    readers = g.consumers(node.output[0])
    if len(readers) == 1 and readers[0][0].op_type == "Add" and not g.is_graph_output(node.output[0]):
        other = readers[0][0].input[1 - readers[0][1]]
        value = g.tensor(other)
        if value is not None and g.use_count(other) == 1 and value.shape[-1:] == contrib.shape \
                and value.size == contrib.size:
            work.arrays[other] = work.get(other) + contrib.reshape(value.shape)
            return
    pending.append((node.output[0], contrib, node.input[1]))


def _insert_adds(g: GraphIndex, pending: list[tuple[str, np.ndarray, str]], masks: dict[str, np.ndarray]) -> None:
    """MatMul readers without a bias Add get one: MatMul -> Add(folded constant) -> old output."""
    by_output = {}
    for out, contrib, weight in pending:
        if weight in masks:  # the MatMul loses output columns itself
            contrib = np.delete(contrib, np.flatnonzero(masks[weight]))
        by_output[out] = contrib
    replacements = {}
    for i, node in enumerate(g.graph.node):
        if node.op_type == "MatMul" and node.output[0] in by_output:
            out = node.output[0]
            bias = g.add_initializer(f"{out}_folded_bias", by_output[out].astype(np.float32))
            node.output[0] = g.unique_name(f"{out}_unfolded")
            add = helper.make_node("Add", [node.output[0], bias], [out], name=g.unique_name(f"{node.name}_fold"))
            replacements[i] = [node, add]
    replace_nodes(g.graph, replacements)


def remove_output_channels(model: onnx.ModelProto, drop: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Return a copy of ``model`` with the masked output channels really removed.

    ``drop`` maps a compressible weight's ONNX name to a bool mask over its output channels.
    The layer's weight and bias, the per-channel parameters on the way (BatchNormalization,
    per-channel Add/Mul...), Reshape targets and the readers' input channels all shrink; the
    removed channels' constant output is folded into the readers' biases (exact except Conv
    readers with padding, see the module doc). Graph outputs keep their shapes.
    Raises ModelError when a layer is not supported, a mask has the wrong length, or a mask
    would remove every channel of a layer.
    """
    new = copy.deepcopy(model)
    g, shapes = GraphIndex(new), static_shapes(new)
    opset = _opset(new)
    order = {w.name: i for i, w in enumerate(compressible_weights(new))}
    routes: list[tuple[ChannelRoute, np.ndarray]] = []
    for name in sorted(drop, key=lambda n: order.get(n, -1)):
        mask = np.asarray(drop[name], dtype=bool).reshape(-1)
        if not mask.any():
            continue
        try:
            route = trace_route(g, shapes, name)
        except Unsupported as exc:
            raise ModelError(f"cannot remove output channels of {name!r}: {exc}",
                             "pick channels with removable_channels()") from exc
        if len(mask) != route.channels or mask.all():
            raise ModelError(f"drop mask for {name!r} has {int(mask.sum())} of {len(mask)} channels set, layer has "
                             f"{route.channels}", "give one entry per output channel and keep at least one")
        routes.append((route, mask))
    work = _Work(g)
    for route, mask in routes:  # the result must equal the model with these channels zeroed
        np.moveaxis(work.get(route.weight), route.out_axis, 0)[mask] = 0.0
    pending: list[tuple[str, np.ndarray, str]] = []
    for route, mask in routes:
        base = _layer_constant(work, route)
        for path in route.paths:
            k = base
            for step in path.steps:
                k = _apply_step(work, opset, step, k)
            _fold(g, work, path, k, mask, pending)
    _shrink(work, routes)
    work.write()
    _insert_adds(g, pending, {r.weight: m for r, m in routes})
    clear_value_info(new)
    try:
        onnx.checker.check_model(new)
    except Exception as exc:
        raise ModelError(f"structured pruning produced an invalid model: {exc}", "report this with the model") from exc
    return new


def _shrink(work: _Work, routes: list[tuple[ChannelRoute, np.ndarray]]) -> None:
    """Delete the removed channels' entries from every constant, all in original index space."""
    cuts: dict[str, dict[int, set[int]]] = {}
    for route, mask in routes:
        shrinks = list(route.shrinks)
        node = route.layer
        if len(node.input) > 2 and node.input[2]:
            bias = work.get(node.input[2])
            if bias.ndim and bias.shape[-1] == route.channels:
                shrinks.append((node.input[2], bias.ndim - 1, 1))
        for name, axis, block in shrinks:
            cuts.setdefault(name, {}).setdefault(axis, set()).update(expand_features(mask, block).tolist())
        for name, block in route.reshapes:
            work.get(name)[1] -= int(mask.sum()) * block
    for name, axes in cuts.items():
        value = work.get(name)
        for axis, idx in axes.items():
            value = np.delete(value, sorted(idx), axis=axis)
        work.arrays[name] = value
