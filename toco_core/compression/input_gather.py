"""Dense layers read only the input features their weights use: a Gather before the layer.

Structured pruning (structured.py) removes a channel where the layer producing it can lose it. A
dense layer reading the model's own input cannot make its producer compute less: the MLP's first
Gemm reads 784 pixels, and a prune plan zeroes every weight of the pixels no calibration digit ever
lit (MLP seed 2 at prune 50%: 277 of 784 columns). Such a layer gets a Gather of the features its
weights read, and its weight loses the zero columns:

    Gemm(A, B) with column k of B all zero  ==  Gemm(Gather(A, kept, axis=-1), B[kept])

which is exact for finite inputs (0 * x = 0). The runnable file and the layer's work shrink by the
share of the columns dropped, and so does the storage form, which codes the model that runs
(reduced_codes.py).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper

from toco_core.compression.channel_routes import reader_input_axis
from toco_core.compression.graph_edit import GraphIndex, attr, clear_value_info, replace_nodes, static_shapes
from toco_core.errors import ModelError

# A Gather costs a copy of the kept features and a node's dispatch per run, a few microseconds: it pays
# only where it saves many weights. On the uint8 camera model's 686 -> 29 Gemm, dropping 36 columns
# (1,044 weights) made the 30 us model 1.18x slower; the MLP's first layer at prune 50% drops 277 x 279.
MIN_DROPPED_SHARE = 0.05
MIN_DROPPED_WEIGHTS = 32_768


def unread_input_features(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Gemm (transA 0) / MatMul nodes with a private 2-D constant weight and unread input features.

    Returns node name -> the sorted indices of the input features some weight reads, for nodes
    where at least MIN_DROPPED_SHARE of the features, and MIN_DROPPED_WEIGHTS weights, are read by
    zero weights only (and at least one feature is read). Nodes without a name are skipped: the
    rewrite finds nodes by name.
    """
    g, shapes = GraphIndex(model), static_shapes(model)
    out = {}
    for node in model.graph.node:
        if not node.name or node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            continue
        w = g.tensor(node.input[1])
        rank = len(shapes.get(node.input[0], ()))
        if w is None or w.ndim != 2 or g.use_count(node.input[1]) != 1 or rank < 2 \
                or (node.op_type == "Gemm" and rank != 2):
            continue
        axis = reader_input_axis(node)
        read = np.moveaxis(w != 0, axis, 0).any(axis=1)
        dropped = int((~read).sum())  # features; each holds w.size / len(read) weights
        worth = dropped >= MIN_DROPPED_SHARE * len(read) and dropped * w.size // len(read) >= MIN_DROPPED_WEIGHTS
        if read.any() and worth:
            out[node.name] = np.flatnonzero(read)
    return out


def gather_read_features(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of ``model`` whose dense layers read only the input features their weights use.

    Returns (the model, node name -> input features kept) for the nodes rewritten; the model
    itself when none qualifies (unread_input_features). Outputs are those of the model for finite
    inputs. Raises ModelError when the rewritten model does not pass onnx's checker.
    """
    chosen = unread_input_features(model)
    if not chosen:
        return model, {}
    new = copy.deepcopy(model)
    g = GraphIndex(new)
    replacements = {}
    for i, node in enumerate(new.graph.node):
        kept = chosen.get(node.name)
        if kept is None:
            continue
        w = g.tensor(node.input[1])
        assert w is not None  # unread_input_features checked it
        g.set_tensor(node.input[1], np.take(w, kept, axis=reader_input_axis(node)))
        index = g.add_initializer(f"{node.name}_read_features", kept.astype(np.int32))
        gathered = g.unique_name(f"{node.input[0]}_read")
        gather = helper.make_node("Gather", [node.input[0], index], [gathered], axis=-1,
                                  name=g.unique_name(f"{node.name}_gather"))
        node.input[0] = gathered
        replacements[i] = [gather, node]
    replace_nodes(new.graph, replacements)
    clear_value_info(new)
    try:
        onnx.checker.check_model(new)
    except Exception as exc:
        raise ModelError(f"reading only the used input features produced an invalid model: {exc}",
                         "report this with the model") from exc
    return new, {name: len(kept) for name, kept in chosen.items()}
