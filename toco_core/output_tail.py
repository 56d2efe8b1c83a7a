"""The scored output of a model and the pass-through tail after it.

Converters append post-processing to classifiers (ArgMax, a label lookup such as
``ai.onnx.ml.ArrayFeatureExtractor`` / ``LabelEncoder``, ``Cast``, ``ZipMap``) and export two
outputs (label, probabilities). Nothing in such a tail has weights, so the analysis scores one
float tensor - the *scored output* - and works on the *head*: the sub-graph from the input to
that tensor. The device model is the full graph with only the head's weights replaced, so the
tail is carried over untouched and every original output keeps its name and type.
"""

from __future__ import annotations

import onnx

from toco_core.errors import ModelError
from toco_core.onnx_model import compressible_weights

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def _tensor_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Every typed value of the graph: outputs, value_info and what shape inference adds."""
    types = {v.name: v.type for v in model.graph.value_info}
    try:
        # inference may not know an op (a custom domain): the declared types still count
        inferred = onnx.shape_inference.infer_shapes(model)
        types.update({v.name: v.type for v in inferred.graph.value_info})
    except Exception:  # noqa: BLE001 - inference is a help here, never a requirement
        pass
    types.update({v.name: v.type for v in model.graph.output})
    return types


def _is_float_tensor(t: onnx.TypeProto | None) -> bool:
    return t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type in _FLOAT_TYPES


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in model.graph.node for name in node.output if name}


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return {n for node in g.node for n in node.output if n} | {i.name for i in g.input}


def detect_scored_output(model: onnx.ModelProto) -> str:
    """The tensor the analysis scores when no ``--output`` is given.

    Takes the model; returns a tensor name: the first float tensor among the graph outputs (the
    probabilities of a converter's (label, probabilities) pair, or a plain classifier's only
    output); when no output is a float tensor (a ZipMap'd or label-only export), the first float
    tensor met walking back from the outputs through the post-processing nodes (the
    probabilities that feed ArgMax / ZipMap). Raises ModelError when there is none.
    """
    for out in model.graph.output:
        if _is_float_tensor(out.type):
            return str(out.name)
    types = _tensor_types(model)  # shape inference only where an internal tensor is needed
    producers = _producers(model)
    inits = {t.name for t in model.graph.initializer}
    frontier = [o.name for o in model.graph.output]
    seen: set[str] = set()
    while frontier:  # breadth first: the float tensor nearest to the outputs
        nxt = []
        for name in frontier:
            node = producers.get(name)
            if node is None:
                continue
            for src in node.input:
                if not src or src in seen or src in inits:
                    continue
                seen.add(src)
                if _is_float_tensor(types.get(src)):
                    return str(src)
                nxt.append(src)
        frontier = nxt
    raise ModelError(f"model {model.graph.name!r} has no float output or float tensor feeding its outputs",
                     "name the tensor to score with --output")


def scored_output(model: onnx.ModelProto, name: str | None = None) -> str:
    """Check or detect the scored output.

    Takes the model and the requested tensor name (None: detect_scored_output). Returns the
    name. Raises ModelError when the name is no tensor of the graph, when the tail after it
    holds compressible weights (the analysis would not cover them), or when nothing is found.
    """
    if name is None:
        name = detect_scored_output(model)
    elif name not in _tensor_names(model):
        outputs = ", ".join(o.name for o in model.graph.output)
        raise ModelError(f"--output {name!r} is no tensor of model {model.graph.name!r} (its outputs: {outputs})",
                         "name a graph output or an intermediate tensor")
    head = set(_head_indices(model, name))
    tail_inputs = {i for k, n in enumerate(model.graph.node) if k not in head for i in n.input}
    try:
        weights = {w.name for w in compressible_weights(model)}
    except ModelError:
        weights = set()
    behind = sorted(weights & tail_inputs)
    if behind:
        raise ModelError(f"weights {behind[:3]} of model {model.graph.name!r} come after the scored output {name!r}",
                         "score the output the last weighted layer feeds (--output)")
    return name


def _head_indices(model: onnx.ModelProto, name: str) -> list[int]:
    """Graph positions of the nodes ``name`` depends on, ascending (positions, not node objects:
    protobuf hands out a new wrapper on every access)."""
    nodes = model.graph.node
    wanted, keep = {name}, []
    for k in range(len(nodes) - 1, -1, -1):
        if wanted.intersection(nodes[k].output):
            keep.append(k)
            wanted.update(i for i in nodes[k].input if i)
    return keep[::-1]


def scored_head(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The sub-graph from the inputs to the scored tensor ``name``, with ``name`` its only output.

    Returns ``model`` itself when ``name`` already is its only output (the usual classifier:
    nothing to cut, no copy). Weights keep their names, so a head of a compressed device model is
    the compressed head. Raises ModelError when ``name`` is no tensor of the graph.
    """
    g = model.graph
    if len(g.output) == 1 and g.output[0].name == name:
        return model
    if name not in _tensor_names(model):
        raise ModelError(f"tensor {name!r} is not in model {g.name!r}", "name a tensor of the graph")
    nodes = [g.node[k] for k in _head_indices(model, name)]
    used = {i for n in nodes for i in n.input} | {name}
    out = next((o for o in g.output if o.name == name), None)
    if out is None:
        types = _tensor_types(model)
        out = onnx.helper.make_value_info(name, types[name]) if name in types else \
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    head = onnx.helper.make_graph(
        nodes, g.name,
        [i for i in g.input if i.name in used],
        [out],
        [t for t in g.initializer if t.name in used],
        value_info=[v for v in g.value_info if v.name in used and v.name != name],
    )
    result = onnx.helper.make_model(head, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    result.producer_name = model.producer_name
    return result


def fidelity_view(model: onnx.ModelProto, name: str | None) -> onnx.ModelProto:
    """What every fidelity measurement runs: the head of ``model`` at the scored tensor ``name``.

    ``name`` None (an analysis made before output selection) means the first graph output, as
    then. Works on a compressed device model as on the base (the weights keep their names).
    Raises ModelError when ``name`` is not in the model.
    """
    return scored_head(model, name or model.graph.output[0].name)
