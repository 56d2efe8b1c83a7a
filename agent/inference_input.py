"""What the serving model accepts: its input spec, and the check every request passes first.

An input that fails here is the caller's fault (HTTP 400), never the model's: the engine's
trial (and its automatic rollback) only counts errors on inputs that passed ``check_input``.
"""

from __future__ import annotations

import io
import math
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from toco_core.errors import ModelError, TocoError
from toco_core.model_inputs import ModelInputs

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


class InputSpec(NamedTuple):
    """The first input of a session: name, shape (None for a dynamic dimension), numpy dtype.

    The session's view of toco_core.onnx_model.InputSpec, kept here so the daemon never
    imports onnx (it serves bytes through onnxruntime only).
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype


class InputError(TocoError):
    """Raised when an inference input does not fit the model (shape, dtype, values)."""


def check_input(x: Any, spec: InputSpec, max_batch: int) -> np.ndarray:
    """Convert ``x`` to the model's dtype and check it against the input spec.

    A float input takes any numeric data; an integer input (e.g. uint8 camera bytes) takes
    integers within its range only, never floats (see _exact_integers). Returns a C-contiguous
    array. Raises InputError naming what is wrong: not numeric (complex, object or string arrays
    included: never cast with a loss), floats or out-of-range values for an integer input, wrong
    rank, a fixed dimension that differs, an empty or too large batch, NaN/inf.
    """
    if isinstance(x, np.ndarray) and (x.dtype.kind not in NUMERIC_KINDS or x.dtype.fields is not None):
        raise InputError(f"inputs of dtype {x.dtype} are not accepted", "send bool, integer or float data")
    if spec.dtype.kind in "iu":
        x = _exact_integers(x, spec)
    try:
        arr = np.ascontiguousarray(np.asarray(x, dtype=spec.dtype))
    except (TypeError, ValueError) as exc:
        raise InputError(f"inputs are not a numeric array of {spec.dtype}: {exc}",
                         "send a rectangular nested list of numbers") from exc
    want = "[" + ", ".join("N" if d is None else str(d) for d in spec.shape) + "]"
    if arr.ndim != len(spec.shape):
        raise InputError(f"inputs have shape {list(arr.shape)} ({arr.ndim} dims); the model input "
                         f"{spec.name!r} is {want}", "add or remove axes; the first axis is the batch")
    for axis, (got, need) in enumerate(zip(arr.shape, spec.shape, strict=True)):
        if need is not None and got != need:
            raise InputError(f"inputs have shape {list(arr.shape)}; the model input {spec.name!r} is {want} "
                             f"(axis {axis} must be {need}, got {got})", "resize the input to the model's shape")
    if arr.shape[0] < 1 or arr.shape[0] > max_batch:
        raise InputError(f"batch of {arr.shape[0]} samples; accepted are 1..{max_batch}",
                         "split the request into smaller batches")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InputError("inputs contain NaN or infinity", "send finite numbers")
    return arr


def _exact_integers(x: Any, spec: InputSpec) -> np.ndarray:
    """``x`` as an integer array every value of which the integer model input holds exactly.

    A model that takes uint8 camera bytes and receives floats was almost always sent data scaled
    for another model (0..1 instead of 0..255): casting would truncate it to zeros and answer
    confidently wrong, so floats are refused whatever their values, and so are out-of-range integers.
    Raises InputError naming the dtype the model takes.
    """
    try:
        arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise InputError(f"inputs are not a numeric array of {spec.dtype}: {exc}",
                         "send a rectangular nested list of numbers") from exc
    if arr.dtype.kind not in "biu":
        raise InputError(f"inputs are {arr.dtype} data, but model input {spec.name!r} takes {spec.dtype}",
                         f"send the {spec.dtype} values as the sensor delivers them (an .npy of {spec.dtype}, "
                         "or a JSON list of integers), not data scaled for a float model")
    info = np.iinfo(spec.dtype)
    if arr.size and arr.dtype.kind != "b" and (arr.min() < info.min or arr.max() > info.max):
        raise InputError(f"inputs hold values {arr.min()}..{arr.max()}; model input {spec.name!r} takes "
                         f"{spec.dtype} ({info.min}..{info.max})", f"send values within {info.min}..{info.max}")
    return arr


def session_input_spec(session: ort.InferenceSession) -> InputSpec:
    """The first input of a session as an InputSpec (dynamic dimensions are None).

    Raises ModelError for an input type other than a numeric tensor.
    """
    return session_input_specs(session)[0]


def session_input_specs(session: ort.InferenceSession) -> tuple[InputSpec, ...]:
    """Every input of a session as InputSpecs, in graph order. Raises ModelError for a non-numeric one."""
    specs = []
    for inp in session.get_inputs():
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is None:
            raise ModelError(f"model input {inp.name!r} has type {inp.type}", "serve models with numeric tensor inputs")
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in inp.shape)
        specs.append(InputSpec(inp.name, shape, np.dtype(dtype)))
    return tuple(specs)


def check_inputs(x: Any, specs: tuple[InputSpec, ...], max_batch: int) -> np.ndarray | ModelInputs:
    """``check_input`` for every model input: returns the array (one input) or a ModelInputs.

    A model with several inputs takes a mapping of input name -> array or nested list, one per
    input, all with the same batch. Raises InputError for a missing or unknown name, differing
    batches, or whatever check_input finds in one input (the message names it).
    """
    if len(specs) == 1:
        return check_input(x, specs[0], max_batch)
    names = [s.name for s in specs]
    if not isinstance(x, dict):
        raise InputError(f"the model takes {len(specs)} inputs {names}; one array was sent",
                         'send {"inputs": {name: array, ...}} as JSON, or an .npz with one array per name')
    if set(x) != set(names):
        raise InputError(f"inputs {sorted(x)} sent; the model takes {names}", "send exactly one array per input name")
    arrays = {}
    for spec in specs:
        try:
            arrays[spec.name] = check_input(x[spec.name], spec, max_batch)
        except InputError as exc:
            raise InputError(f"input {spec.name!r}: {exc.message}", exc.hint) from None
    batches = {k: len(v) for k, v in arrays.items()}
    if len(set(batches.values())) != 1:
        raise InputError(f"inputs differ in their batch: {batches}", "send the same samples for every input")
    return ModelInputs(arrays)


_NPY_MAGIC = b"\x93NUMPY"
# bool, signed and unsigned integers, floats: what a numeric model input is made from. Complex, object,
# string, datetime or structured data would be cast with a loss (complex -> real) or not at all.
NUMERIC_KINDS = "biuf"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}  # header -> dtype, shape, fortran


def _read_header(body: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """``(dtype, shape, fortran_order, data offset)`` of an .npy body, checked without reading the data.

    Raises ValueError with a one-line reason: no magic, a broken header, a dtype that is not
    NUMERIC_KINDS, or a header that declares more data than the body holds.
    """
    fp = io.BytesIO(body)
    try:
        major, _minor = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise ValueError(f"bad .npy header: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in NUMERIC_KINDS:
        raise ValueError(f"dtype {dtype} is not supported; send bool, integer or float data")
    if any(d < 0 for d in shape):
        raise ValueError(f"the header declares a negative dimension in shape {list(shape)}")
    _check_size(shape, dtype, len(body) - fp.tell())
    return dtype, shape, fortran, fp.tell()


def _check_size(shape: tuple[int, ...], dtype: np.dtype, have: int) -> None:
    # checked before anything is allocated: a header may claim any shape, the body proves the size
    need = math.prod(shape) * dtype.itemsize
    if have < need:
        raise ValueError(f"body is truncated: the header declares shape {list(shape)} of {dtype} ({need} bytes), "
                         f"the body holds {have} data bytes")


def load_npy(body: bytes) -> np.ndarray:
    """Decode an .npy request body (no pickles, no copy); returns a read-only array over ``body``.

    A line sends the same shape and dtype over and over, and numpy parses every header with
    ``ast.literal_eval``: a header decoded once is remembered and later bodies with the same
    header are viewed in place. The declared size is checked against the body before anything
    is allocated, so a forged header cannot exhaust memory.
    Raises ValueError (one line) for a body that is not a valid .npy array of a supported dtype.
    """
    if body[:6] != _NPY_MAGIC or len(body) < 10:
        raise ValueError("not an .npy file (magic string missing)")
    start = 10 if body[6] == 1 else 12
    size = int.from_bytes(body[8:start], "little")
    header = body[start:start + size]
    known = _npy_headers.get(header)
    if known is None:
        dtype, shape, fortran, _ = _read_header(body)
        if len(_npy_headers) >= 16:  # a handful of shapes in practice; never unbounded
            _npy_headers.clear()
        _npy_headers[header] = known = (dtype, shape, fortran)
    dtype, shape, fortran = known
    _check_size(shape, dtype, len(body) - start - size)
    return np.frombuffer(body, dtype, math.prod(shape), start + size).reshape(shape, order="F" if fortran else "C")


def load_npz(body: bytes) -> dict[str, np.ndarray]:
    """Decode an .npz request body (``numpy.savez``: one array per model input name).

    Only stored (uncompressed) members are read: their size is bounded by the body's, where a
    compressed member could expand without limit. Each member is checked like an .npy body.
    Raises ValueError (one line) for a body that is not such an archive.
    """
    import zipfile  # noqa: PLC0415 - only models with several inputs need it

    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            members = archive.infolist()
            if not members:
                raise ValueError("the archive holds no arrays")
            arrays = {}
            for info in members:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"member {info.filename!r} is compressed; send numpy.savez, not savez_compressed")
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                arrays[name] = load_npy(archive.read(info))
            return arrays
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not an .npz archive: {exc}") from None
