"""encode_samples / decode_samples on real digits and edge-case arrays; self_test_samples' formula."""

from __future__ import annotations

import hashlib
import io
import lzma
import struct

import numpy as np
import pytest

from toco_core import sample_codec as sc
from toco_core.demo.data import mnist_splits
from toco_core.errors import BundleError, ConfigError
from toco_core.sample_codec import (
    decode_outputs,
    decode_samples,
    encode_outputs,
    encode_samples,
    self_test_margin,
    self_test_samples,
)


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return (type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


def _round_trip(x: np.ndarray) -> bytes:
    blob = encode_samples(x)
    assert _same_bytes(x, decode_samples(blob))
    return blob


def _fields(blob: bytes) -> dict:
    """mode, transform, shuffle and code width from the container (see the module doc)."""
    p = blob[sc._HEADER.size:]
    pos = 1 + p[0]
    pos += 1 + 8 * p[pos]
    mode, transform, shuffle, _, _, _, _, width = sc._FIELDS.unpack_from(p, pos)
    return {"mode": sc.MODES[mode], "transform": sc.TRANSFORMS[transform], "shuffle": bool(shuffle), "width": width}


def _reseal(payload: bytes) -> bytes:
    """A container around ``payload`` with a matching hash (a writer bug or a forgery, not corruption)."""
    return sc._HEADER.pack(sc.MAGIC, sc.FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


@pytest.fixture(scope="module")
def mnist() -> np.ndarray:
    return mnist_splits().x_pool[:1000]


@pytest.fixture(scope="module")
def sk_digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images[:, None].astype(np.float32) / np.float32(16))


# ------------------------------------------------------------------------------- round trips


def test_mnist_digits_round_trip_as_one_byte_codes_and_small(mnist):
    blob = _round_trip(mnist)
    assert _fields(blob) == {"mode": "table", "transform": "none", "shuffle": False, "width": 1}
    buf = io.BytesIO()
    np.savez_compressed(buf, x=mnist)  # what an analysis directory ships today
    # measured: 145.5 KB = 0.046x of 3.14 MB float32, 0.54x of savez_compressed's 268 KB
    assert len(blob) < 0.06 * mnist.nbytes, len(blob)
    assert len(blob) < 0.7 * len(buf.getvalue()), (len(blob), len(buf.getvalue()))


def test_normalised_uint8_images_keep_the_table(mnist):
    x = ((mnist - np.float32(0.1307)) / np.float32(0.3081)).astype(np.float32)
    blob = _round_trip(x)
    assert _fields(blob)["mode"] == "table" and _fields(blob)["width"] == 1
    assert len(blob) < 1.01 * len(encode_samples(mnist))  # the affine map costs only its table


def test_sklearn_digits_round_trip(sk_digits):
    blob = _round_trip(sk_digits)
    assert _fields(blob)["mode"] == "table" and _fields(blob)["width"] == 1
    assert len(blob) < 0.1 * sk_digits.nbytes, len(blob)  # 17 levels on 8x8: measured 38,744 B = 0.084x


def test_smooth_images_take_the_horizontal_delta():
    # ramps: every row rises by one level per pixel, from a different start
    start = np.random.default_rng(0).integers(0, 128, size=(200, 1, 32, 1))
    x = ((start + np.arange(96)) % 256).astype(np.float32) / np.float32(255)
    blob = _round_trip(x)
    assert _fields(blob)["transform"] in ("left", "left+up")
    table, codes = sc._table_form(x)
    plain = lzma.compress(table.tobytes() + codes.tobytes(), format=lzma.FORMAT_RAW, filters=sc._lzma_filters(1 << 20))
    assert len(blob) < len(plain)


def test_many_distinct_floats_stay_raw_and_are_exact():
    x = np.random.default_rng(1).normal(size=(80, 1000)).astype(np.float32)
    assert len(np.unique(x)) > 65536
    blob = _round_trip(x)
    assert _fields(blob)["mode"] == "raw"
    assert len(blob) <= x.nbytes + 200  # never much larger than the raw bytes


def test_up_to_65536_distinct_floats_use_two_byte_codes():
    x = (np.random.default_rng(2).permutation(np.arange(65536) % 65536)[:60000].reshape(300, 200)
         .astype(np.float32) * np.float32(0.37))
    blob = _round_trip(x)
    assert _fields(blob)["mode"] == "table" and _fields(blob)["width"] == 2


def test_float_bit_patterns_survive():
    nan = np.float32(np.nan)
    odd_nan = (nan.view(np.uint32) + 7).view(np.float32)
    x = np.array([[0.0, -0.0, nan, odd_nan, np.inf, -np.inf, 1e-45, -1.5]], dtype=np.float32)
    _round_trip(x)
    _round_trip(x.astype(np.float64))
    _round_trip(x.astype(np.float16))
    _round_trip(x.astype(">f4"))


@pytest.mark.parametrize("x", [
    np.random.default_rng(3).integers(0, 10, size=1000),                          # labels, int64
    np.random.default_rng(4).integers(-(2**31), 2**31 - 1, size=(30, 30), dtype=np.int32),
    np.random.default_rng(5).integers(0, 256, size=(10, 1, 28, 28), dtype=np.uint8),
    np.array([0, 2**64 - 1], dtype=np.uint64),
    np.array([-(2**63), -(2**63) + 5]),
    np.array([2**63 - 1, 2**63 - 9]),
    np.array(7, dtype=np.int8),
    np.array(1.5),
    np.zeros((0, 3), dtype=np.float32),
    np.random.default_rng(6).integers(0, 2, size=100).astype(bool),
    (np.arange(6).reshape(2, 3) + 1j).astype(np.complex64),
    np.arange(24.0).reshape(4, 6)[:, ::2],                                       # not contiguous
], ids=lambda x: f"{x.dtype}{x.shape}")
def test_other_arrays_round_trip(x):
    _round_trip(x)


def test_integers_take_their_smallest_width():
    labels = np.random.default_rng(7).integers(100, 110, size=5000)  # int64, span 9
    blob = _round_trip(labels)
    assert _fields(blob) | {"transform": None} == {"mode": "offset", "transform": None, "shuffle": False, "width": 1}
    assert len(blob) < 0.1 * labels.nbytes


def test_outputs_round_trip_and_keep_the_better_packing():
    logits = (np.random.default_rng(8).normal(size=(1000, 10)) * 4).astype(np.float32)
    blob = encode_outputs(logits)
    assert _same_bytes(logits, decode_outputs(blob))
    plain = lzma.compress(logits.tobytes(), format=lzma.FORMAT_RAW, filters=sc._lzma_filters(1 << 16))
    assert len(blob) <= len(plain) + 100  # the header is ~70 bytes


def test_lenet5_outputs_round_trip(lenet5, digits):
    from toco_core.runtime import run_model

    out = run_model(lenet5, digits.x_pool[:500])
    blob = encode_outputs(out)
    assert _same_bytes(out, decode_outputs(blob))
    assert len(blob) < out.nbytes


# ----------------------------------------------------------------------------- refused blobs


def test_corrupt_byte_is_refused(mnist):
    blob = bytearray(encode_samples(mnist[:50]))
    blob[len(blob) // 2] ^= 0x01
    with pytest.raises(BundleError, match="corrupt"):
        decode_samples(bytes(blob))


@pytest.mark.parametrize("keep", [0, 10, sc._HEADER.size, -1])
def test_truncation_is_refused(mnist, keep):
    blob = encode_samples(mnist[:50])
    with pytest.raises(BundleError, match="truncated") as err:
        decode_samples(blob[:keep])
    assert "fetch" in str(err.value)


def test_bad_magic_and_version_are_refused(mnist):
    blob = encode_samples(mnist[:5])
    with pytest.raises(BundleError, match="magic"):
        decode_samples(b"TOCOQ" + blob[5:])
    with pytest.raises(BundleError, match="version 9"):
        decode_samples(blob[:5] + bytes([9]) + blob[6:])


def test_payload_that_lies_about_its_size_is_refused(mnist):
    blob = encode_samples(mnist[:5])
    payload = bytearray(blob[sc._HEADER.size:])
    shape_at = 1 + payload[0] + 1
    (n,) = struct.unpack_from("<Q", payload, shape_at)
    struct.pack_into("<Q", payload, shape_at, n + 1)  # one more sample than the body holds
    with pytest.raises(BundleError, match="promises"):
        decode_samples(_reseal(bytes(payload)))
    struct.pack_into("<Q", payload, shape_at, n)
    payload[shape_at + 8 * payload[shape_at - 1]] = 7  # mode 7 does not exist
    with pytest.raises(BundleError, match="does not decode"):
        decode_samples(_reseal(bytes(payload)))


def test_non_numeric_arrays_are_refused():
    with pytest.raises(ConfigError):
        encode_samples(np.array(["a", "b"]))
    with pytest.raises(ConfigError):
        encode_samples(np.array([object()]))


# ------------------------------------------------------------------------- how many samples


@pytest.mark.parametrize("budget,expected", [(0.01, 1584), (0.02, 784), (0.05, 304)])
def test_self_test_samples_formula(budget, expected):
    n = self_test_samples(budget)
    assert n == expected == round(16 * (1 - budget) / budget)
    # the gate's margin at the budget is at most half the budget with n, not with n - 1
    assert self_test_margin(n, budget) <= budget / 2 < self_test_margin(n - 1, budget)


def test_self_test_margin_is_the_gates():
    from toco_core.selftest import gate_margin

    for n in (10, 300, 1584, 5000):
        for budget, predicted in ((0.01, 0.0), (0.02, 0.015), (0.05, 0.08), (0.001, 0.0)):
            assert self_test_margin(n, budget, predicted) == gate_margin(predicted, budget, n)


def test_tiny_budgets_are_bounded_by_the_curves_noise_floor():
    from toco_core.solver import disagreement_bound

    n = self_test_samples(0.001)  # the gate's 0.2-point floor alone would ask for 999
    assert n == 2000
    assert disagreement_bound(1 / n, n) <= 0.001 < disagreement_bound(1 / (n - 1), n - 1)


def test_a_prediction_above_the_budget_needs_more_samples():
    assert self_test_samples(0.01, predicted=0.02) > self_test_samples(0.01)


@pytest.mark.parametrize("budget,predicted", [(0.0, 0.0), (1.0, 0.0), (0.01, -0.1), (0.01, 1.0)])
def test_self_test_samples_refuses_non_fractions(budget, predicted):
    with pytest.raises(ConfigError):
        self_test_samples(budget, predicted)
