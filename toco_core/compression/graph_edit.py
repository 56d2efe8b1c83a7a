"""Small graph-surgery helpers shared by the runtime-format and structured-pruning rewrites.

A constant tensor is an initializer or the output of a ``Constant`` node with a ``value``
attribute; both are read and replaced the same way, keyed by their ONNX name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from toco_core.errors import ModelError


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of attribute ``name`` of ``node``, or ``default`` when it is absent."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set (or add) attribute ``name`` of ``node`` to ``value``."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


class GraphIndex:
    """Look-ups over one graph: constants, producers, consumers, unique names.

    The index reads the graph when built; call ``refresh()`` after adding or removing nodes.
    Replacing a constant's value (``set_tensor``) keeps the index valid.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.refresh()

    def refresh(self) -> None:
        """Re-read nodes, initializers and names after structural changes."""
        g = self.graph
        self._inits = {t.name: t for t in g.initializer}
        self._consts: dict[str, onnx.TensorProto] = {}
        self._producer: dict[str, onnx.NodeProto] = {}
        self._consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        self._consts[node.output[0]] = a.t
            for out in node.output:
                self._producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self._consumers.setdefault(name, []).append((node, i))
        self._outputs = {o.name for o in g.output}
        self._names = set(self._inits) | set(self._producer) | {i.name for i in g.input}

    def tensor(self, name: str) -> np.ndarray | None:
        """The value of constant ``name`` as a numpy array, or None if it is not a constant."""
        proto = self._inits.get(name) or self._consts.get(name)
        return None if proto is None else numpy_helper.to_array(proto)

    def set_tensor(self, name: str, value: np.ndarray) -> None:
        """Replace constant ``name`` by ``value`` (its shape may change; dtype is kept as given).

        Raises ModelError when ``name`` is not a constant of the graph.
        """
        proto = self._inits.get(name) or self._consts.get(name)
        if proto is None:
            raise ModelError(f"tensor {name!r} is not a constant of the graph", "this is a bug in the rewrite")
        proto.CopyFrom(numpy_helper.from_array(np.asarray(value), name if name in self._inits else proto.name))
        for inp in self.graph.input:  # old IR versions list initializers as inputs too
            if inp.name == name:
                inp.CopyFrom(helper.make_tensor_value_info(name, proto.data_type, list(value.shape)))

    def add_initializer(self, hint: str, value: np.ndarray) -> str:
        """Add ``value`` as a new initializer under a fresh name derived from ``hint``; returns the name."""
        name = self.unique_name(hint)
        tensor = numpy_helper.from_array(np.asarray(value), name)
        self.graph.initializer.append(tensor)
        self._inits[name] = self.graph.initializer[-1]
        return name

    def unique_name(self, hint: str) -> str:
        """A tensor name not used in the graph yet (and reserve it)."""
        name, i = hint, 0
        while name in self._names:
            i += 1
            name = f"{hint}_{i}"
        self._names.add(name)
        return name

    def consumers(self, name: str) -> list[tuple[onnx.NodeProto, int]]:
        """Every (node, input index) that reads ``name``."""
        return list(self._consumers.get(name, []))

    def use_count(self, name: str) -> int:
        """How many node inputs read ``name``."""
        return len(self._consumers.get(name, []))

    def is_graph_output(self, name: str) -> bool:
        """Whether ``name`` is an output of the graph."""
        return name in self._outputs


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Shapes of every tensor onnx shape inference can find (None for a dynamic dimension).

    Initializers are included. A tensor whose rank is unknown is missing from the result.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference gives up on some custom ops; fall back to what the model states
        inferred = model
    g = inferred.graph
    out: dict[str, tuple[int | None, ...]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for t in g.initializer:
        out[t.name] = tuple(int(d) for d in t.dims)
    return out


def replace_nodes(graph: onnx.GraphProto, replacements: dict[int, list[onnx.NodeProto]]) -> None:
    """Replace node ``i`` of ``graph`` by the nodes ``replacements[i]`` (in that order).

    Any NodeProto reference taken from the graph before this call is stale afterwards.
    """
    new_nodes = []
    for i, node in enumerate(graph.node):
        new_nodes.extend(replacements.get(i, [node]))
    del graph.node[:]
    graph.node.extend(new_nodes)


def clear_value_info(model: onnx.ModelProto) -> None:
    """Drop the intermediate shape annotations (stale after a rewrite changes shapes)."""
    del model.graph.value_info[:]


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    """Import ``domain`` at ``version`` at least (used for com.microsoft contrib ops)."""
    for op in model.opset_import:
        if op.domain == domain:
            op.version = max(op.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers (and their graph-input entries) that no node or graph output reads."""
    g = model.graph
    used = {name for node in g.node for name in node.input} | {o.name for o in g.output}
    kept = [t for t in g.initializer if t.name in used]
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits or i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.input[:]
    g.input.extend(inputs)
