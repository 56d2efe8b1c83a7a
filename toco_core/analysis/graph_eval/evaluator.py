"""GraphEvaluator: run an ONNX graph with torch so gradients flow to its weights, keyed by ONNX name.

The graph is walked once at construction: every op is checked against the registry (an
unknown op raises UnsupportedOpError right away, never a wrong answer later), initializers
and Constant nodes become tensors, and the nodes the first output needs are planned in order.
A call is a pure function of (x, weights), so ``torch.func.grad`` and ``torch.func.vmap``
compose with it::

    ev = GraphEvaluator(model)
    per_sample = torch.func.vmap(torch.func.grad(lambda w, xi: loss(ev(xi[None], w))),
                                 in_dims=(None, 0))(ev.weights, x)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import onnx
import torch
from onnx import numpy_helper

from toco_core.analysis.graph_eval.node import OpNode, to_tensor
from toco_core.analysis.graph_eval.ops_shape import constant
from toco_core.analysis.graph_eval.registry import OPS
from toco_core.errors import ModelError, UnsupportedOpError
from toco_core.onnx_model import compressible_weights

_DEFAULT_DOMAINS = ("", "ai.onnx")
Tap = Callable[[OpNode, list[torch.Tensor | None]], None]


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return int(imp.version)
    raise ModelError(f"model {model.graph.name!r} imports no default ONNX opset", "export it again")


class GraphEvaluator:
    """Differentiable evaluation of an ONNX model's first output from its graph inputs.

    Attributes:
        weights: float32 copies of the trainable weights, keyed by ONNX name.
        input_names: the graph inputs, in order; ``input_name`` the first (fed by a bare tensor).
        output_name: the output returned.
        opset: the model's default-domain opset, which picks each op's semantics.
    """

    def __init__(self, model: onnx.ModelProto, trainable: Iterable[str] | None = None) -> None:
        """Check and plan the graph.

        ``trainable``: ONNX names of the weights to differentiate (initializers or Constant
        outputs); default: all compressible weights. Raises UnsupportedOpError for any op
        outside the registry (docs/ops.md), ModelError for an unknown or non-float trainable
        name, a graph without input, or a needed value nothing produces.
        """
        graph = model.graph
        model_name = graph.name or "<unnamed>"
        self.opset = _default_opset(model)
        nodes = []
        for i, proto in enumerate(graph.node):
            op = OpNode.from_proto(proto, i, self.opset)
            if proto.domain not in _DEFAULT_DOMAINS or proto.op_type not in OPS:
                op_type = proto.op_type if proto.domain in _DEFAULT_DOMAINS else f"{proto.domain}.{proto.op_type}"
                raise UnsupportedOpError(op_type, op.name, model_name)
            nodes.append(op)

        values = {t.name: to_tensor(numpy_helper.to_array(t)) for t in graph.initializer}
        for op in nodes:
            if op.op_type == "Constant":
                values[op.outputs[0]] = constant(op, [])
        feeds = [i.name for i in graph.input if i.name not in values]
        if not feeds:
            raise ModelError(f"model {model_name!r} has no graph input to feed", "export it with an input")
        self.input_name = feeds[0]
        self.input_names = feeds
        self.output_name = graph.output[0].name

        names = [w.name for w in compressible_weights(model)] if trainable is None else list(dict.fromkeys(trainable))
        for name in names:
            if name not in values:
                raise ModelError(f"trainable weight {name!r} is not an initializer or Constant of {model_name!r}",
                                 "use the weight's ONNX name")
            if not values[name].is_floating_point():
                raise ModelError(f"trainable weight {name!r} holds {values[name].dtype}, not floats",
                                 "only float weights can be differentiated")
        self.weights: dict[str, torch.Tensor] = {n: values.pop(n).to(torch.float32) for n in names}
        self._constants = values
        self._plan = self._needed(nodes, model_name)

    def _needed(self, nodes: list[OpNode], model_name: str) -> list[OpNode]:
        """The non-Constant nodes the first output depends on, in graph order; checks every input is produced."""
        wanted = {self.output_name}
        keep = []
        for op in reversed(nodes):
            if wanted.intersection(op.outputs):
                keep.append(op)
                wanted.update(n for n in op.inputs if n)
        plan = [op for op in reversed(keep) if op.op_type != "Constant"]
        known = {*self.input_names, *self._constants, *self.weights}
        for op in plan:
            for name in op.inputs:
                if name and name not in known:
                    raise ModelError(f"{op.op_type} node {op.name!r} reads {name!r}, which no node, initializer "
                                     f"or graph input of {model_name!r} provides", "export the model again")
            known.update(op.outputs)
        return plan

    def __call__(self, x: torch.Tensor | dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None,
                 tap: Tap | None = None) -> torch.Tensor:
        """Evaluate the first output with ``x`` as the first input, or ``x[name]`` as each named input.

        ``weights`` overrides some or all trainable weights (by ONNX name); the rest keep the
        model's values. ``tap(node, inputs)``, when given, sees every node's input values just
        before the node runs (e.g. to collect the activations a weight multiplies). Raises
        ModelError for an unknown weight name, inputs that are not the graph's, or when an op fails.
        """
        env = {**self._constants, **self.weights}
        if weights is not None:
            unknown = set(weights) - self.weights.keys()
            if unknown:
                raise ModelError(f"weights {sorted(unknown)} are not trainable weights of this evaluator",
                                 "pass them in `trainable` when building it")
            env.update(weights)
        if isinstance(x, dict):
            if set(x) != set(self.input_names):
                raise ModelError(f"inputs {sorted(x)} given, the graph takes {self.input_names}",
                                 "feed one tensor per graph input, by name")
            env.update(x)
        elif len(self.input_names) > 1:
            raise ModelError(f"one tensor given, the graph takes {self.input_names}", "feed a dict by input name")
        else:
            env[self.input_name] = x
        for op in self._plan:
            args = [env[name] if name else None for name in op.inputs]
            if tap is not None:
                tap(op, args)
            try:
                result = OPS[op.op_type](op, args)
            except (RuntimeError, IndexError, ValueError, TypeError) as exc:
                raise op.error(f"failed on inputs of shapes {[None if a is None else tuple(a.shape) for a in args]}: "
                               f"{exc}", "check the model with onnxruntime; see docs/ops.md") from exc
            outs = (result,) if isinstance(result, torch.Tensor) else result
            # an op computes only the outputs it supports: optional trailing ones (MaxPool's unnamed
            # Indices, BatchNormalization's training stats) are dropped on purpose
            for name, value in zip(op.outputs, outs, strict=False):
                if name:
                    env[name] = value
        return env[self.output_name]
