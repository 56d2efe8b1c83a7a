"""encode_model / decode_model on the real demo models."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import numpy as np
import pytest

from toco_core.compression import storage
from toco_core.compression.storage import QuantizedTensor, decode_model, dequantize, encode_model, quantize_to_codes
from toco_core.demo.data import mnist_splits
from toco_core.errors import BundleError, ConfigError, ModelError
from toco_core.onnx_model import model_bytes, read_weights, with_weights
from toco_core.runtime import run_model

from .conftest import realistic_codes


def _histogram_entropy_bytes(tensors: list[QuantizedTensor]) -> float:
    total = 0.0
    for q in tensors:
        _, counts = np.unique(q.codes, return_counts=True)
        total += -(counts * np.log2(counts / counts.sum())).sum() / 8
    return total


@pytest.mark.parametrize("which", ["lenet", "mlp"])
def test_round_trip_is_exact(which, request):
    model = request.getfixturevalue(which)
    tensors = realistic_codes(model)
    decoded = decode_model(encode_model(model, tensors))
    expected = with_weights(model, {q.name: dequantize(q) for q in tensors})
    assert model_bytes(decoded) == model_bytes(expected)


def test_lenet_transfer_size_near_code_entropy(lenet):
    tensors = realistic_codes(lenet)
    blob = encode_model(lenet, tensors)
    entropy_bytes = _histogram_entropy_bytes(tensors)
    # codes at or below their histogram entropy; graph, biases, steps and tables under 3.5 KB
    assert len(blob) <= entropy_bytes + 3500, (len(blob), entropy_bytes)
    assert len(blob) * 12 < len(model_bytes(lenet))


def test_decoded_model_runs_like_dequantized_weights(lenet):
    tensors = realistic_codes(lenet)
    x = mnist_splits().x_heldout[:200]
    decoded = decode_model(encode_model(lenet, tensors))
    expected = with_weights(lenet, {q.name: dequantize(q) for q in tensors})
    np.testing.assert_array_equal(run_model(decoded, x), run_model(expected, x))
    base = run_model(lenet, x)
    assert (run_model(decoded, x).argmax(1) == base.argmax(1)).mean() > 0.9  # the codes are realistic


def test_subset_of_weights_keeps_the_others(lenet):
    tensors = realistic_codes(lenet)[:2]
    decoded = decode_model(encode_model(lenet, tensors))
    before, after = read_weights(lenet), read_weights(decoded)
    for name in list(before)[2:]:
        np.testing.assert_array_equal(before[name], after[name])
    np.testing.assert_array_equal(after[tensors[0].name], dequantize(tensors[0]))


def test_quantize_error_within_half_step(lenet):
    w = next(iter(read_weights(lenet).values()))
    steps = np.full(w.shape[0], 0.01, np.float32)
    q = quantize_to_codes(w, steps, 0, "w")
    assert q.codes.dtype == np.int32 and q.codes.shape == w.shape
    assert np.abs(dequantize(q) - w).max() <= 0.005 + 1e-6


@pytest.fixture(scope="module")
def blob(lenet) -> bytes:
    return encode_model(lenet, realistic_codes(lenet))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:20], "truncated"),
        (lambda b: b"", "truncated"),
        (lambda b: b + b"\0", "truncated or padded"),
        (lambda b: b"NOTIT" + b[5:], "magic"),
        (lambda b: b[:5] + bytes([99]) + b[6:], "version 99"),
        (lambda b: b[:-100] + bytes([b[-100] ^ 0x10]) + b[-99:], "SHA-256"),
        (lambda b: b[:60] + bytes([b[60] ^ 1]) + b[61:], "SHA-256"),
    ],
)
def test_damaged_blobs_raise_bundle_error(blob, damage, message):
    with pytest.raises(BundleError, match=message):
        decode_model(damage(blob))


def test_valid_hash_but_garbage_payload_raises_bundle_error():
    import hashlib

    payload = struct.pack("<I", 3) + b"abc"
    forged = storage._HEADER.pack(storage.MAGIC, storage.FORMAT_VERSION, len(payload),
                                  hashlib.sha256(payload).digest()) + payload
    with pytest.raises(BundleError, match="does not decode"):
        decode_model(forged)
    meta = lzma.compress(b"\0" * 8, format=lzma.FORMAT_RAW, filters=storage._LZMA_FILTERS)
    payload = struct.pack("<I", len(meta)) + meta
    forged = storage._HEADER.pack(storage.MAGIC, storage.FORMAT_VERSION, len(payload),
                                  hashlib.sha256(payload).digest()) + payload
    with pytest.raises(BundleError):
        decode_model(forged)


def test_bad_inputs_raise_typed_errors(lenet):
    q = realistic_codes(lenet)[0]
    with pytest.raises(ModelError, match="not an initializer"):
        encode_model(lenet, [QuantizedTensor("nope", q.codes, q.steps, 0)])
    with pytest.raises(ModelError, match="codes are"):
        encode_model(lenet, [QuantizedTensor(q.name, q.codes[:3], q.steps[:3], 0)])
    with pytest.raises(ConfigError, match="twice"):
        encode_model(lenet, [q, q])
    with pytest.raises(ConfigError, match="steps"):
        quantize_to_codes(np.ones((2, 3)), np.array([1.0, 0.0]), 0, "w")
    with pytest.raises(ConfigError, match="output channels"):
        quantize_to_codes(np.ones((2, 3)), np.array([1.0]), 0, "w")
    with pytest.raises(ConfigError, match="13-bit"):
        encode_model(lenet, [QuantizedTensor(q.name, q.codes * 1000, q.steps, 0)])
    with pytest.raises(ConfigError, match="not integers"):
        encode_model(lenet, [QuantizedTensor(q.name, q.codes.astype(np.float32), q.steps, 0)])


def test_float16_exact_steps_are_stored_in_half(lenet):
    tensors = realistic_codes(lenet)
    rounded = [QuantizedTensor(q.name, q.codes, q.steps.astype(np.float16).astype(np.float32), q.out_axis)
               for q in tensors]
    full, half = encode_model(lenet, tensors), encode_model(lenet, rounded)
    channels = sum(q.steps.size for q in tensors)
    assert len(full) - len(half) > channels  # about 2 bytes saved per channel
    decoded = read_weights(decode_model(half))
    for q in rounded:
        np.testing.assert_array_equal(decoded[q.name], dequantize(q))


FIXTURES = Path(__file__).parent / "fixtures"


def test_side_arrays_use_the_smallest_width_and_older_blobs_still_decode(lenet):
    """Version 2 stores the side arrays as u1 for small codes; blobs written by the version-1 and
    version-2 writers (committed as fixtures, with the weights that writer's own decoder read back:
    a tiny conv + gemm model, made by the storage.py of commits 50cede8 and 18e6535) decode to the
    same weights."""
    import json

    codes = realistic_codes(lenet)
    blob = storage.encode_model(lenet, codes)
    payload = blob[storage._HEADER.size:]
    (meta_len,) = struct.unpack_from("<I", payload)
    meta = lzma.decompress(payload[4:4 + meta_len], format=lzma.FORMAT_RAW, filters=storage._LZMA_FILTERS)
    head_len, _ = struct.unpack_from("<II", meta)
    assert {e["side_dtype"] for e in json.loads(meta[8:8 + head_len]) if "stream" in e} == {"|u1"}
    for version in (1, 2):
        old_blob = (FIXTURES / f"storage_v{version}.blob").read_bytes()
        assert old_blob[5] == version
        with np.load(FIXTURES / f"storage_v{version}_weights.npz") as expected:
            decoded = read_weights(storage.decode_model(old_blob))
            assert sorted(decoded) == sorted(expected.files)
            for name in decoded:
                np.testing.assert_array_equal(decoded[name], expected[name])


def test_float16_exact_biases_travel_in_half_and_come_back_exact(lenet):
    """Version 3: a float32 initializer that float16 holds exactly (a build's corrected biases) costs
    2 bytes a value; one it does not hold stays float32. Both decode to the very same values."""
    import onnx

    codes = realistic_codes(lenet)
    biases = {t.name: onnx.numpy_helper.to_array(t) for t in lenet.graph.initializer
              if len(t.dims) == 1 and t.data_type == onnx.TensorProto.FLOAT}
    assert biases and not any(np.array_equal(b.astype(np.float16).astype(np.float32), b) for b in biases.values())
    halved = with_weights(lenet, {k: b.astype(np.float16).astype(np.float32) for k, b in biases.items()})
    full, half = encode_model(lenet, codes), encode_model(halved, codes)
    values = sum(b.size for b in biases.values())
    assert len(full) - len(half) > 1.5 * values  # LZMA cannot pack float32 biases; float16 halves them
    for model, blob in ((lenet, full), (halved, half)):
        assert blob[5] == storage.FORMAT_VERSION == 3
        expected = with_weights(model, {q.name: dequantize(q) for q in codes})
        assert model_bytes(decode_model(blob)) == model_bytes(expected)
