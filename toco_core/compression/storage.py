"""Storage/transfer form of a compressed model: integer codes per channel, entropy coded.

Container (all integers little-endian)::

    magic  b"TOCOQ"         5 bytes
    version                 1 byte   (FORMAT_VERSION)
    payload length          4 bytes
    SHA-256 of the payload  32 bytes
    payload:
        meta length         4 bytes
        meta                raw LZMA2 of: index JSON, graph with the coded weights stripped,
                            per-tensor steps / non-zero counts / min and max |code| arrays
                            (u1/u2/u4 as the index's side_dtype says; u4 in version 1), then
                            (version 3) the float16 values of the half entries
        code streams        one range-coded stream per tensor (toco_core.compression.entropy)

Decoding puts ``codes * steps`` (float32) back into the stripped graph, so the decoded model
is exactly ``with_weights(model, {name: dequantize(q)})``. Every other float32 initializer whose
values float16 holds exactly (a build's corrected biases: bias_correction.apply_deltas)
travels as float16: an index entry ``{"name", "half": count}`` and 2 bytes a value, put back as
the same float32 values.
"""

from __future__ import annotations

import copy
import json
import lzma
import math
import struct
from dataclasses import dataclass

import numpy as np
import onnx

from toco_core.compression import entropy
from toco_core.errors import BundleError, ConfigError, ModelError
from toco_core.onnx_model import model_bytes, with_weights
from toco_core.sealed_blob import SealedFormat

MAGIC = b"TOCOQ"
# 2: side arrays in the smallest unsigned width (index key side_dtype); 3: float16-exact float32
# initializers in 2 bytes (index entries with "half"). Older versions still decode.
FORMAT_VERSION = 3
_HEADER = struct.Struct("<5sBI32s")
_SEALED = SealedFormat(MAGIC, FORMAT_VERSION, (1, 2, FORMAT_VERSION), _HEADER, "compressed model",
                       "encode_model", "fetch it again", "re-encode the model")
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized weight: ``value = codes * steps`` along ``out_axis``; code 0 is exactly zero."""

    name: str
    codes: np.ndarray  # int32, the weight's shape
    steps: np.ndarray  # float32, one positive step per output channel
    out_axis: int


def _check_steps(steps: np.ndarray, shape: tuple[int, ...], out_axis: int, name: str) -> np.ndarray:
    if not -len(shape) <= out_axis < len(shape):
        raise ConfigError(f"weight {name!r}: out_axis {out_axis} is outside its rank {len(shape)}")
    steps = np.asarray(steps, dtype=np.float32)
    if steps.shape != (shape[out_axis],):
        raise ConfigError(
            f"weight {name!r}: {steps.shape} steps for {shape[out_axis]} output channels",
            "give one step per output channel",
        )
    if not (np.isfinite(steps).all() and (steps > 0).all()):
        raise ConfigError(f"weight {name!r}: steps must be finite and > 0")
    return steps


def _per_channel(steps: np.ndarray, ndim: int, out_axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[out_axis] = -1
    return steps.reshape(shape)


def quantize_to_codes(w: np.ndarray, steps: np.ndarray, out_axis: int, name: str) -> QuantizedTensor:
    """Round a weight to per-channel integer codes: codes = rint(w / step[channel]).

    Takes the float weight, one positive step per output channel, the channel axis and the
    ONNX name. Returns a QuantizedTensor. Raises ConfigError for bad steps/axis or codes
    that do not fit int32.
    """
    w = np.asarray(w, dtype=np.float32)
    steps = _check_steps(steps, w.shape, out_axis, name)
    q = np.rint(w / _per_channel(steps, w.ndim, out_axis))
    if not np.isfinite(q).all() or np.abs(q).max(initial=0) >= 2**31:
        raise ConfigError(f"weight {name!r}: codes overflow int32", "use larger steps")
    return QuantizedTensor(name, q.astype(np.int32), steps, out_axis % w.ndim)


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """float32 weight = codes * steps[channel]. Raises ConfigError for inconsistent steps."""
    steps = _check_steps(q.steps, q.codes.shape, q.out_axis, q.name)
    result: np.ndarray = q.codes.astype(np.float32) * _per_channel(steps, q.codes.ndim, q.out_axis)
    return result


def _rows(q: QuantizedTensor) -> np.ndarray:
    """Codes as a (channels, rest) int32 array. Raises ConfigError for non-integer codes."""
    if not np.issubdtype(np.asarray(q.codes).dtype, np.integer):
        raise ConfigError(f"weight {q.name!r}: codes are {np.asarray(q.codes).dtype}, not integers",
                          "build them with quantize_to_codes")
    codes = np.moveaxis(np.asarray(q.codes, dtype=np.int32), q.out_axis, 0)
    return codes.reshape(codes.shape[0], -1)


def _find_tensor(model: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            result: onnx.TensorProto = tensor
            return result
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return next((a.t for a in node.attribute if a.name == "value"), None)
    return None


def _strip(model: onnx.ModelProto, tensors: list[QuantizedTensor]) -> onnx.ModelProto:
    """Copy of the model whose coded weights keep name, dims and type but no data."""
    stripped = copy.deepcopy(model)
    for q in tensors:
        tensor = _find_tensor(stripped, q.name)
        if tensor is None:
            raise ModelError(f"weight {q.name!r} is not an initializer or Constant of the model",
                             "use the model's ONNX names")
        if tuple(tensor.dims) != q.codes.shape or tensor.data_type != onnx.TensorProto.FLOAT:
            raise ModelError(f"weight {q.name!r}: model holds a {tuple(tensor.dims)} tensor of type "
                             f"{tensor.data_type}, codes are {q.codes.shape}", "quantize this model's weights")
        for field in ("raw_data", "float_data", "external_data"):
            tensor.ClearField(field)
        tensor.ClearField("data_location")
    return stripped


def _half_tensors(model: onnx.ModelProto, coded: set[str]) -> list[onnx.TensorProto]:
    """The float32 initializers besides ``coded`` that float16 holds exactly, value for value."""
    out = []
    for tensor in model.graph.initializer:
        if tensor.name in coded or tensor.data_type != onnx.TensorProto.FLOAT or tensor.data_location:
            continue
        values = onnx.numpy_helper.to_array(tensor).ravel()
        as16 = values.astype(np.float16)
        if values.size and np.isfinite(as16).all() and np.array_equal(as16.astype(np.float32), values):
            out.append(tensor)
    return out


def _step_dtype(steps: np.ndarray) -> np.dtype:
    # Steps that float16 holds exactly cost half: the solver may round its steps to get this.
    as16 = steps.astype(np.float16)
    return np.dtype("<f2") if np.isfinite(as16).all() and (as16.astype(np.float32) == steps).all() else np.dtype("<f4")


def _side_dtype(side: entropy.SideInfo) -> np.dtype:
    # the smallest unsigned width holding every count/code: LeNet-5's side arrays shrink 4x
    top = max(int(side.nnz.max(initial=0)), int(side.max_abs.max(initial=0)))
    return np.dtype("<u1") if top < 1 << 8 else np.dtype("<u2") if top < 1 << 16 else np.dtype("<u4")


def encode_model(model: onnx.ModelProto, tensors: list[QuantizedTensor]) -> bytes:
    """Serialize a model with some weights as entropy-coded integer codes (see module doc).

    Takes the ONNX model and the QuantizedTensors of (some of) its weights. Returns the blob.
    Raises ModelError when a tensor does not match the model, ConfigError for bad codes.
    """
    names = [q.name for q in tensors]
    if len(set(names)) != len(names):
        raise ConfigError("the same weight is listed twice", "give each weight once")
    stripped = _strip(model, tensors)
    index: list[dict[str, object]] = []
    halves = []
    for tensor in _half_tensors(stripped, set(names)):
        halves.append(onnx.numpy_helper.to_array(tensor).astype("<f2").tobytes())
        index.append({"name": tensor.name, "half": len(halves[-1]) // 2})
        for field in ("raw_data", "float_data"):
            tensor.ClearField(field)
    graph = model_bytes(stripped)
    arrays, streams = [], []
    for q in tensors:
        steps = _check_steps(q.steps, q.codes.shape, q.out_axis, q.name)
        rows = _rows(q)
        side = entropy.side_info(rows)
        try:
            stream = entropy.encode_rows(rows, side)
        except ValueError as exc:
            raise ConfigError(f"weight {q.name!r}: {exc}", "use at most 13-bit codes") from None
        dtype = _step_dtype(steps)
        index.append({"name": q.name, "shape": list(q.codes.shape), "out_axis": q.out_axis,
                      "step_dtype": dtype.str, "stream": len(stream)})
        side_dt = _side_dtype(side)
        index[-1]["side_dtype"] = side_dt.str
        arrays += [steps.astype(dtype).tobytes(), side.nnz.astype(side_dt).tobytes(),
                   side.min_abs.astype(side_dt).tobytes(), side.max_abs.astype(side_dt).tobytes()]
        streams.append(stream)
    head = json.dumps(index, separators=(",", ":")).encode()
    meta = struct.pack("<II", len(head), len(graph)) + head + graph + b"".join(arrays) + b"".join(halves)
    # a dictionary just larger than the data: same output, without preset 9's 64 MB set-up (30+ ms);
    # the decoder's larger dictionary reads it unchanged
    filters = [{**_LZMA_FILTERS[0], "dict_size": min(max(len(meta), 4096), 64 << 20)}]
    meta_z = lzma.compress(meta, format=lzma.FORMAT_RAW, filters=filters)
    payload = struct.pack("<I", len(meta_z)) + meta_z + b"".join(streams)
    return _SEALED.seal(payload)


def decode_model(blob: bytes) -> onnx.ModelProto:
    """Inverse of encode_model: the model with float32 ``codes * steps`` weights put back.

    Raises BundleError on bad magic, unknown version, truncation, hash mismatch or a
    payload that does not decode.
    """
    payload = _SEALED.open(blob)
    try:
        return _decode_payload(payload)
    except BundleError:
        raise
    except Exception as exc:  # a payload with a valid hash that still fails: writer bug or forgery
        raise BundleError(f"compressed model payload does not decode: {type(exc).__name__}: {exc}",
                          "re-encode the model") from None


def _take(buf: bytes, pos: int, n: int) -> tuple[bytes, int]:
    if pos + n > len(buf):
        raise BundleError("compressed model payload ends early", "re-encode the model")
    return buf[pos:pos + n], pos + n


def _decode_payload(payload: bytes) -> onnx.ModelProto:
    (meta_len,) = struct.unpack_from("<I", payload)
    meta_z, pos = _take(payload, 4, meta_len)
    meta = lzma.decompress(meta_z, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    head_len, graph_len = struct.unpack_from("<II", meta)
    head, mpos = _take(meta, 8, head_len)
    graph, mpos = _take(meta, mpos, graph_len)
    model = onnx.load_from_string(graph)
    weights = {}
    entries = json.loads(head)
    for entry in entries:
        if "half" in entry:
            continue
        shape = tuple(entry["shape"])
        axis = entry["out_axis"]
        channels = shape[axis]
        dtype = np.dtype(entry["step_dtype"])
        raw, mpos = _take(meta, mpos, channels * dtype.itemsize)
        steps = np.frombuffer(raw, dtype=dtype).astype(np.float32)
        side_dt = np.dtype(entry.get("side_dtype", "<u4"))  # version 1 wrote every side array as u4
        width = side_dt.itemsize * channels
        raw, mpos = _take(meta, mpos, 3 * width)
        side = entropy.SideInfo(*(np.frombuffer(raw[k * width:(k + 1) * width], side_dt).astype(np.uint32)
                                  for k in range(3)))
        stream, pos = _take(payload, pos, entry["stream"])
        n_cols = math.prod(shape) // channels if channels else 0
        rows = entropy.decode_rows(stream, side, n_cols)
        moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
        codes = np.moveaxis(rows.reshape(moved), 0, axis)
        weights[entry["name"]] = dequantize(QuantizedTensor(entry["name"], codes, steps, axis))
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for entry in entries:
        if "half" in entry:
            raw, mpos = _take(meta, mpos, 2 * int(entry["half"]))
            weights[entry["name"]] = np.frombuffer(raw, "<f2").astype(np.float32).reshape(dims[entry["name"]])
    if pos != len(payload) or mpos != len(meta):
        raise BundleError("compressed model payload has trailing bytes", "re-encode the model")
    return with_weights(model, weights)
