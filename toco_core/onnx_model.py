"""ONNX model access with numpy only: loading, the compressible weights, swapping weights.

A *compressible weight* is an initializer or a ``Constant`` node output that is the weight
input of Conv, ConvTranspose, Gemm or MatMul. Every weight is keyed by its ONNX name.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

from toco_core.errors import ModelError

# op type -> index of the weight among the node's inputs
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass(frozen=True)
class WeightInfo:
    """One compressible weight: its ONNX name, consumer and output-channel axis."""

    name: str
    op_type: str
    node_name: str
    shape: tuple[int, ...]
    out_axis: int
    source: Literal["initializer", "constant"]

    @property
    def size(self) -> int:
        """Number of scalar weights."""
        return int(np.prod(self.shape)) if self.shape else 1


def load_model(source: str | Path | bytes) -> onnx.ModelProto:
    """Read and check an ONNX model.

    Takes a path or the serialized bytes; returns the ModelProto.
    Raises ModelError when the file is missing, not ONNX, or fails the ONNX checker.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        if isinstance(source, bytes):
            model = onnx.load_from_string(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise ModelError(f"model file {name} does not exist", "check the path")
            model = onnx.load(str(path), load_external_data=True)
    except ModelError:
        raise
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise ModelError(f"{name} is not a readable ONNX model: {exc}", "export it again") from exc
    if not model.graph.node:
        raise ModelError(f"{name} is not a usable ONNX model: its graph has no nodes", "export it again")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"{name} fails the ONNX checker: {exc}", "export it again") from exc
    return model


def model_bytes(model: onnx.ModelProto) -> bytes:
    """Serialize a model deterministically."""
    result: bytes = model.SerializeToString(deterministic=True)
    return result


def model_hash(model: onnx.ModelProto | bytes) -> str:
    """SHA-256 hex digest of the serialized model."""
    data = model if isinstance(model, bytes) else model_bytes(model)
    return hashlib.sha256(data).hexdigest()


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    out = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = attr.t
    return out


def _out_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return rank - 1  # MatMul: [..., K, N]


def compressible_weights(model: onnx.ModelProto) -> list[WeightInfo]:
    """List the compressible weights of a model in graph order.

    Returns one WeightInfo per weight (a weight shared by several nodes is listed once).
    Raises ModelError if there is none.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = _constant_tensors(graph)
    seen: dict[str, WeightInfo] = {}
    for node in graph.node:
        idx = _WEIGHT_INPUT.get(node.op_type)
        if idx is None or len(node.input) <= idx:
            continue
        name = node.input[idx]
        if name in seen:
            continue
        tensor = inits.get(name) or consts.get(name)
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        shape = tuple(int(d) for d in tensor.dims)
        if len(shape) < 2:
            continue
        seen[name] = WeightInfo(
            name=name,
            op_type=node.op_type,
            node_name=node.name or f"{node.op_type}_{len(seen)}",
            shape=shape,
            out_axis=_out_axis(node, len(shape)),
            source="initializer" if name in inits else "constant",
        )
    if not seen:
        raise ModelError(
            f"model {model.graph.name!r} has no compressible weights "
            "(float initializers or Constants feeding Conv, ConvTranspose, Gemm or MatMul)",
            "TOCO compresses such layers only",
        )
    return list(seen.values())


def read_weights(model: onnx.ModelProto, infos: list[WeightInfo] | None = None) -> dict[str, np.ndarray]:
    """Return the compressible weights as float32 arrays keyed by ONNX name."""
    infos = infos if infos is not None else compressible_weights(model)
    inits = {t.name: t for t in model.graph.initializer}
    consts = _constant_tensors(model.graph)
    return {
        w.name: numpy_helper.to_array(inits.get(w.name) or consts[w.name]).astype(np.float32)
        for w in infos
    }


def with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Return a copy of ``model`` whose named initializers/Constants hold ``weights``.

    Shapes must match the originals. Raises ModelError for an unknown name or a shape change.
    """
    new = copy.deepcopy(model)
    remaining = dict(weights)
    for tensor in new.graph.initializer:
        if tensor.name in remaining:
            _replace_tensor(tensor, remaining.pop(tensor.name))
    for node in new.graph.node:
        if node.op_type == "Constant" and node.output[0] in remaining:
            for attr in node.attribute:
                if attr.name == "value":
                    _replace_tensor(attr.t, remaining.pop(node.output[0]))
    if remaining:
        raise ModelError(f"weights {sorted(remaining)} are not in the model", "use the model's ONNX names")
    return new


def with_outputs(model: onnx.ModelProto, names: list[str] | tuple[str, ...]) -> onnx.ModelProto:
    """``model`` with the named (intermediate) tensors added as float graph outputs.

    Returns the model itself when they all are outputs already, else a copy. The names are not
    checked here: onnxruntime rejects a name that is no tensor of the graph.
    """
    missing = [n for n in dict.fromkeys(names) if n not in {o.name for o in model.graph.output}]
    if not missing:
        return model
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in missing)
    return exposed


def _replace_tensor(tensor: onnx.TensorProto, value: np.ndarray) -> None:
    if tuple(tensor.dims) != tuple(value.shape):
        raise ModelError(
            f"weight {tensor.name!r} has shape {tuple(tensor.dims)}, got {tuple(value.shape)}",
            "shapes must not change when swapping weights",
        )
    tensor.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=np.float32), tensor.name))


@dataclass(frozen=True)
class InputSpec:
    """The first graph input: name, shape (None for a dynamic dimension), numpy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype


def input_spec(model: onnx.ModelProto) -> InputSpec:
    """Describe the model's first non-initializer input. Raises ModelError if there is none."""
    return input_specs(model)[0]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Describe every non-initializer graph input, in graph order. Raises ModelError if there is none."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        ttype = inp.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        specs.append(InputSpec(inp.name, dims, np.dtype(dtype)))
    if not specs:
        raise ModelError(f"model {model.graph.name!r} has no graph input", "export it with an input")
    return specs


def output_kind(model: onnx.ModelProto) -> Literal["logits", "probs", "logprobs"]:
    """Whether the first output is raw logits, Softmax probabilities or LogSoftmax."""
    out = model.graph.output[0].name
    for node in model.graph.node:
        if out in node.output:
            kinds: dict[str, Literal["logits", "probs", "logprobs"]] = {"Softmax": "probs", "LogSoftmax": "logprobs"}
            return kinds.get(node.op_type, "logits")
    return "logits"
