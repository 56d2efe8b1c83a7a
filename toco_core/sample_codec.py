"""Lossless compact form of calibration sample arrays and base-model outputs (numpy + stdlib only).

Edge boxes decode it, so it needs neither torch nor onnx. One pair of functions serves
inputs and outputs: the encoder picks the storage form from the data.

Storage forms (``mode``):

- ``table``: a float array with at most 65536 distinct values (bit patterns, so -0.0 and every
  NaN payload are their own entries) is a uint8 (<= 256 values) or uint16 index array plus the
  table of distinct values in ascending order (exact bits). MNIST digits (u8 / 255) and any
  image normalised from uint8, ``(u8 - mean) / std``, are 1 byte per pixel again.
- ``offset``: an integer array is ``x - min`` in the smallest unsigned width holding max - min.
- ``raw``: anything else, in its own dtype and byte order. A float array is tried raw as well:
  when (nearly) every value is distinct, the table costs more than it saves (logits).

Then each stream (an index/offset/raw array) is made smaller losslessly, keeping what is smallest:

- predictive transform of the index/offset codes, modulo 2^bits: ``none``, ``left`` (horizontal
  delta along the last axis) or ``left+up`` (also along the second-to-last: a 2-D delta);
  decoding is one or two wrapping cumulative sums;
- ``shuffle``: words of more than one byte split into byte planes (all first bytes, all second
  bytes, ...): exponent and high mantissa bytes of floats compress apart from the noisy low ones;
- LZMA2 (raw filters, preset 9, dictionary just larger than the data), or stored as is when
  LZMA does not help (random floats).

The choice (form, transform, shuffle) is made by compressing every candidate on a prefix of whole samples of at most
TRIAL_BYTES of the input (the whole array when it is that small), then the winner on everything.

Container (little-endian)::

    magic b"TOCOS" 5 B | version 1 B | payload length 8 B | SHA-256 of the payload 32 B
    payload:
        dtype: length 1 B + numpy dtype str (e.g. "<f4")  | ndim 1 B | shape ndim x 8 B
        mode 1 B | transform 1 B | shuffle 1 B | coder 1 B | LZMA dictionary size 4 B
        table entries 4 B (table mode) | offset 8 B (offset mode: min modulo 2^64)
        code width 1 B (bytes of a stored word)
        body: coder(shuffle(transform(table bytes ++ codes)))   [table bytes never transformed]
"""

from __future__ import annotations

import lzma
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from toco_core.errors import BundleError, ConfigError
from toco_core.sealed_blob import SealedFormat

MAGIC = b"TOCOS"
FORMAT_VERSION = 1
TRIAL_BYTES = 1 << 20
MAX_TABLE = 1 << 16
_HEADER = struct.Struct("<5sBQ32s")
_SEALED = SealedFormat(MAGIC, FORMAT_VERSION, (FORMAT_VERSION,), _HEADER, "sample blob",
                       "encode_samples", "fetch the calibration samples again", "re-encode the samples")
_FIELDS = struct.Struct("<BBBBIIQB")  # mode, transform, shuffle, coder, dict size, table n, offset, code width
# preset 9 without EXTREME: on 1000 MNIST digits' codes extreme saved 0.3% (145,487 -> 145,077 B)
# at 2.3-5x the time (0.34 -> 1.63 s), and 600 224x224 digits are 30 MB of codes
_PRESET = 9

MODES = ("raw", "table", "offset")
TRANSFORMS = ("none", "left", "left+up")
CODERS = ("stored", "lzma")


# ---------------------------------------------------------------------------------------- forms


def _unsigned(itemsize: int) -> np.dtype:
    return np.dtype(f"<u{itemsize}")


def _bits_view(x: np.ndarray) -> np.ndarray:
    """The array's words as unsigned integers of the same width and byte order (exact bit patterns)."""
    order = ">" if x.dtype.byteorder == ">" else "<"
    return x.view(np.dtype(f"{order}u{x.dtype.itemsize}"))


def _table_form(x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(table of distinct values ascending, uint8/uint16 codes) or None when there are > MAX_TABLE.

    Distinct by bit pattern: 0.0 and -0.0, and NaNs with different payloads, are separate
    entries. Ascending by value (ties: by bits; NaNs last), so neighbouring codes are
    neighbouring values and the deltas of smooth images stay small.
    """
    flat = _bits_view(x).reshape(-1)
    # unique + searchsorted, not unique(return_inverse=True): 0.7 s instead of 8.7 s on 5M pixels here
    bits = np.unique(flat)
    if len(bits) > MAX_TABLE:
        return None
    values = bits.view(x.dtype)
    order = np.lexsort((bits, values))  # last key is primary: by value, then by bits
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    code_dtype = np.dtype("<u1") if len(bits) <= 256 else np.dtype("<u2")
    codes = rank.astype(code_dtype)[np.searchsorted(bits, flat)].reshape(x.shape)
    return values[order], codes


def _offset_form(x: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(min, x - min in the smallest unsigned width) or None when max - min needs more than 32 bits."""
    if x.size == 0:
        return 0, np.zeros(x.shape, np.uint8)
    lo, hi = int(x.min()), int(x.max())
    span = hi - lo
    if span >= 1 << 32:
        return None
    width = _unsigned(1 if span < 1 << 8 else 2 if span < 1 << 16 else 4)
    wide = np.uint64 if x.dtype.kind == "u" else np.int64
    # int64 arithmetic may wrap for extreme values; the true difference fits 32 bits, so the wrapped one is it
    codes = (x.astype(wide) - wide(lo)).astype(width)
    return lo, codes


def _from_offset(codes: np.ndarray, lo: int, dtype: np.dtype) -> np.ndarray:
    wide = np.uint64 if dtype.kind == "u" else np.int64
    return np.asarray((codes.astype(wide) + wide(lo)).astype(dtype))  # a 0-d sum is a scalar


# ----------------------------------------------------------------------------------- transforms


def _delta(codes: np.ndarray, transform: str) -> np.ndarray:
    """Prediction residuals modulo 2^bits: left = x[..., j] - x[..., j-1], left+up adds the same along axis -2."""
    out = codes
    axes = {"none": (), "left": (-1,), "left+up": (-1, -2)}[transform] if codes.size else ()
    for axis in axes:
        out = np.diff(out, axis=axis, prepend=np.zeros_like(np.take(out, [0], axis=axis)))
    return out


def _undelta(res: np.ndarray, transform: str) -> np.ndarray:
    out = res
    axes = {"none": (), "left": (-1,), "left+up": (-2, -1)}[transform]
    for axis in axes:
        out = np.cumsum(out, axis=axis, dtype=res.dtype)  # wraps modulo 2^bits like the encoder's diff
    return out


def _transforms(codes: np.ndarray) -> tuple[str, ...]:
    return TRANSFORMS[: 1 + min(codes.ndim, 2)]


def _shuffle(buf: bytes, width: int) -> bytes:
    if width == 1:
        return buf
    return np.frombuffer(buf, np.uint8).reshape(-1, width).T.tobytes()


def _unshuffle(buf: bytes, width: int) -> bytes:
    if width == 1:
        return buf
    return np.frombuffer(buf, np.uint8).reshape(width, -1).T.tobytes()


def _lzma_filters(dict_size: int) -> list[dict[str, Any]]:
    return [{"id": lzma.FILTER_LZMA2, "preset": _PRESET, "dict_size": dict_size}]


def _dict_size(n: int) -> int:
    # just larger than the data: the same output as preset 9's 64 MB, without its set-up cost,
    # and the box's decoder allocates no more than the data needs
    return min(max(1 << max(n - 1, 1).bit_length(), 4096), 64 << 20)


def _compress(body: bytes) -> tuple[int, int, bytes]:
    """(coder, dictionary size, bytes): LZMA2 unless storing is smaller."""
    size = _dict_size(len(body))
    packed = lzma.compress(body, format=lzma.FORMAT_RAW, filters=_lzma_filters(size))
    if len(packed) < len(body):
        return CODERS.index("lzma"), size, packed
    return CODERS.index("stored"), 0, body


# --------------------------------------------------------------------------------------- encode


def _trial_samples(x: np.ndarray) -> int:
    """How many whole samples (axis 0) of ``x`` fit TRIAL_BYTES, at least one; len(x) if all do."""
    if x.ndim == 0 or x.nbytes <= TRIAL_BYTES:
        return len(x) if x.ndim else 1
    return max(TRIAL_BYTES // max(x.nbytes // len(x), 1), 1)


def _prefix(a: np.ndarray, n: int) -> np.ndarray:
    return a if a.ndim == 0 or n >= len(a) else a[:n]


def _body(table: bytes, codes: np.ndarray, transform: str, shuffle: bool) -> bytes:
    stream = table + np.ascontiguousarray(_delta(codes, transform)).tobytes()
    return _shuffle(stream, codes.dtype.itemsize) if shuffle else stream


@dataclass(frozen=True)
class _Form:
    """One storage form of the array: codes (the stream to transform) and what decodes them."""

    mode: str
    codes: np.ndarray
    table: np.ndarray | None = None
    lo: int = 0

    @property
    def table_bytes(self) -> bytes:
        return b"" if self.table is None else self.table.tobytes()


def _forms(x: np.ndarray) -> list[_Form]:
    """The storage forms worth trying: a float's table form and raw (all distinct values make the
    table larger than raw); an integer's offset form (never larger than raw); else raw."""
    if x.dtype.kind == "f" and x.dtype.itemsize in (2, 4, 8):
        table = _table_form(x)
        return ([] if table is None else [_Form("table", table[1], table[0])]) + [_Form("raw", x)]
    if x.dtype.kind in "iu":
        offset = _offset_form(x)
        return [_Form("raw", x) if offset is None else _Form("offset", offset[1], lo=offset[0])]
    return [_Form("raw", x.view(np.uint8) if x.dtype.kind == "b" else x)]


def _pack(forms: list[_Form], n_trial: int) -> tuple[_Form, str, bool, tuple[int, int, bytes]]:
    """(form, transform, shuffle, (coder, dictionary size, body)): the smallest candidate.

    Every form x transform x shuffle is compressed on the same first ``n_trial`` samples; the
    winner is then compressed on the whole array, unless the prefix was the whole array.
    Transforms apply to table and offset codes (image-like integers), not to raw words.
    """
    best: tuple[_Form, str, bool, tuple[int, int, bytes], bool] | None = None
    for form in forms:
        trial = _prefix(form.codes, n_trial)
        transforms = _transforms(trial) if form.mode != "raw" else ("none",)
        shuffles = (False, True) if form.codes.dtype.itemsize > 1 else (False,)
        for t in transforms:
            for sh in shuffles:
                packed = _compress(_body(form.table_bytes, trial, t, sh))
                if best is None or len(packed[2]) < len(best[3][2]):  # ties keep the simpler form (listed first)
                    best = (form, t, sh, packed, trial is form.codes)
    assert best is not None, "there is always at least the raw form"
    form, t, sh, packed, whole = best
    if not whole:
        packed = _compress(_body(form.table_bytes, form.codes, t, sh))
    return form, t, sh, packed


def encode_samples(x: np.ndarray) -> bytes:
    """Encode an array losslessly in its most compact form (see the module doc).

    Takes any numeric array (bool, integer, float, complex; any shape, byte order). Returns the
    blob; decode_samples gives back the same dtype, shape and bytes. The base model's outputs
    use the same function (raw float32: the byte-shuffle is tried against plain LZMA).
    Raises ConfigError for object, string or structured arrays.
    """
    x = np.asarray(x)
    if not x.flags.c_contiguous:
        x = x.copy(order="C")  # not ascontiguousarray: it turns a 0-d array into a 1-d one
    if x.dtype.kind not in "biufc" or x.dtype.names is not None:
        raise ConfigError(f"cannot encode a {x.dtype} array as samples", "pass a numeric numpy array")
    if x.ndim > 255:
        raise ConfigError(f"cannot encode a {x.ndim}-dimensional array", "reshape it to at most 255 axes")
    form, transform, shuffle, (coder, dict_size, body) = _pack(_forms(x), _trial_samples(x))
    dtype = x.dtype.str.encode()
    payload = (struct.pack("<B", len(dtype)) + dtype + struct.pack(f"<B{x.ndim}Q", x.ndim, *x.shape)
               + _FIELDS.pack(MODES.index(form.mode), TRANSFORMS.index(transform), shuffle, coder, dict_size,
                              0 if form.table is None else len(form.table), form.lo % (1 << 64),
                              form.codes.dtype.itemsize)
               + body)
    return _SEALED.seal(payload)


# --------------------------------------------------------------------------------------- decode


def decode_samples(blob: bytes) -> np.ndarray:
    """Inverse of encode_samples: the same dtype, shape and bytes.

    Raises BundleError on bad magic, unknown version, truncation, hash mismatch or a payload
    that does not decode (a writer bug or a forgery with a valid hash).
    """
    payload = _SEALED.open(blob)
    try:
        return _decode_payload(payload)
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"sample blob payload does not decode: {type(exc).__name__}: {exc}",
                          "re-encode the samples") from None


def _decode_payload(p: bytes) -> np.ndarray:
    (n,) = struct.unpack_from("<B", p)
    dtype = np.dtype(p[1 : 1 + n].decode())
    if dtype.kind not in "biufc" or dtype.names is not None:
        raise BundleError(f"sample blob declares a {dtype} array", "re-encode the samples")
    pos = 1 + n
    (ndim,) = struct.unpack_from("<B", p, pos)
    shape = struct.unpack_from(f"<{ndim}Q", p, pos + 1)
    pos += 1 + 8 * ndim
    mode_i, transform_i, shuffle, coder_i, dict_size, n_table, lo, width = _FIELDS.unpack_from(p, pos)
    mode, transform, coder = MODES[mode_i], TRANSFORMS[transform_i], CODERS[coder_i]
    if dtype.kind == "i" and lo >= 1 << 63:
        lo -= 1 << 64
    body = p[pos + _FIELDS.size:]
    count = math.prod(shape)
    table_bytes = n_table * dtype.itemsize
    expected = table_bytes + count * width
    if coder == "lzma":
        # a bounded decoder: a forged length cannot make the box allocate more than the header promises
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_lzma_filters(dict_size))
        body = dec.decompress(body, max_length=expected + 1)
    if len(body) != expected:
        raise BundleError(f"sample blob body holds {len(body)} bytes, its header promises {expected}",
                          "re-encode the samples")
    code_dtype = dtype if mode == "raw" and dtype.kind != "b" else _unsigned(width)
    body = _unshuffle(body, width) if shuffle else body
    codes = _undelta(np.frombuffer(body, code_dtype, count=count, offset=table_bytes).reshape(shape), transform)
    if mode == "table":
        table = np.frombuffer(body, dtype, count=n_table)
        if count and int(codes.max()) >= n_table:
            raise BundleError(f"sample blob has codes beyond its {n_table}-entry table", "re-encode the samples")
        return np.asarray(table[codes])  # indexing with a 0-d array gives a scalar
    if mode == "offset":
        return _from_offset(codes, lo, dtype)
    return codes.view(dtype) if dtype.kind == "b" else codes.copy()


# the base model's outputs on the samples go through the same codec (raw float32: byte-shuffle or not,
# whichever LZMA packs smaller); the names say what a caller stores
encode_outputs = encode_samples
decode_outputs = decode_samples


# ------------------------------------------------------------------------- how many samples


def self_test_margin(n: int, budget: float, predicted: float = 0.0, floor: float = 0.002) -> float:
    """The self-test gate's allowed excess over the prediction with ``n`` samples.

    margin(n) = max(floor, 2 sqrt(p (1 - p) / n)), p = max(predicted, budget): two binomial
    standard errors, at least 0.2 points (toco_core.selftest.gate_margin, restated here so edge
    code needs no onnx). The inverse of self_test_samples.
    """
    p = max(predicted, budget)
    return max(floor, 2.0 * math.sqrt(p * (1 - p) / max(n, 1)))


def _floor_samples(budget: float) -> int:
    """Smallest n whose first non-zero measurement, d = 1/n, the solver can still accept:
    1/n + sqrt((1/n)(1 - 1/n)/n) <= budget (toco_core.solver.disagreement_bound at d = 1/n), ~2/budget."""
    def bound(n: int) -> float:
        return 1.0 / n + math.sqrt((1.0 / n) * (1.0 - 1.0 / n) / n)

    lo, hi = max(math.floor(1 / budget), 1), math.ceil(2 / budget) + 1  # bound(hi) < 2/hi < budget
    while lo < hi:  # bound is decreasing in n: bisect for the first n within the budget
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if bound(mid) <= budget else (mid + 1, hi)
    return lo


def self_test_samples(budget: float, predicted: float = 0.0, share: float = 0.5, floor: float = 0.002) -> int:
    """Self-test (= calibration) samples the fidelity budget's statistics need.

    The gate (toco_core.selftest) accepts measured <= predicted + margin(n), margin(n) =
    max(floor, 2 sqrt(p (1 - p) / n)), p = max(predicted, budget). Asking that margin to be at
    most ``share`` of the budget (a model may then still overshoot its prediction by only half
    the budget unnoticed, share = 0.5):

        2 sqrt(p (1 - p) / n) <= share * b   =>   n >= 4 p (1 - p) / (share * b)^2
                                                  (= 16 (1 - b) / b for p = b, share = 1/2)

    Below the gate's floor (share * b < 0.2 points, budgets under 0.4%) no n brings the margin
    under share * b, so the target is the floor itself: n >= 4 p (1 - p) / floor^2.

    Lower bound: the curves are measured on these same samples, so they resolve disagreement
    in steps of 1/n (solver.noise_floor); the solver accepts a point only when its one-standard-
    error bound d + sqrt(max(d, 1/n)(1 - d)/n) is within the budget (solver.disagreement_bound).
    With fewer than ~2/b samples even the first non-zero step 1/n fails that, and only
    zero-disagreement points (and the base model) remain plannable. That binds at budgets under
    ~0.4%, where the floor caps the first term: 0.1% needs 2,000 samples, not 999. (So below
    0.4% n is not monotone in the budget: 0.4% needs 3,984, 0.2% 1,996 -- the floor, not the
    budget, is then what the samples must resolve.)

    Takes the budget (0 < b < 1), the plan's predicted disagreement, the share and the gate's
    floor. Returns n (1%: 1,584; 2%: 784; 5%: 304). Raises ConfigError for a budget or a
    prediction outside [0, 1).
    """
    if not 0 < budget < 1 or not 0 <= predicted < 1 or not 0 < share <= 1:
        raise ConfigError(f"self_test_samples needs 0 < budget < 1, 0 <= predicted < 1 and 0 < share <= 1 "
                          f"(got {budget}, {predicted}, {share})", "give fractions, e.g. 0.01 for 1%")
    p = max(predicted, budget)
    target = max(share * budget, floor)
    # the small epsilon keeps float noise from adding a sample when the quotient is a whole number
    gate = math.ceil(4 * p * (1 - p) / target**2 - 1e-9)
    return max(gate, _floor_samples(budget))
