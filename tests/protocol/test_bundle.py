"""Bundle container, signed manifests, keys and the pure transfer bookkeeping."""

from __future__ import annotations

import base64
import json
import os
import stat

import numpy as np
import pytest

from toco_core.bundle import (
    canonical_manifest_bytes,
    chunk_bytes,
    generate_private_key,
    key_fingerprint,
    load_private_key,
    load_public_key,
    make_manifest,
    pack_bundle,
    public_key_raw,
    save_private_key,
    save_public_key,
    unpack_bundle,
    verify_manifest,
)
from toco_core.errors import BundleError, TransferError
from toco_core.messages import FailureReason, encode, parse_message
from toco_core.transfer import ChunkBitmap, ChunkCheck, accept_chunk, fits, missing_chunks, verify_assembled

KiB = 1024


def files(n_bytes: int = 300 * KiB, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {"model.onnx": rng.bytes(n_bytes), "analysis/tolerance.safetensors": rng.bytes(5000),
            "analysis/calibration.json": b'{"scales": [0.1, 0.2]}', "empty.txt": b""}


@pytest.fixture(scope="module")
def key():
    return generate_private_key()


def test_pack_is_deterministic_and_round_trips() -> None:
    f = files()
    data = pack_bundle(f)
    assert pack_bundle(dict(reversed(list(f.items())))) == data  # insertion order does not matter
    assert unpack_bundle(data) == f
    assert pack_bundle(files(seed=1)) != data


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", "./a", "back\\slash", "x" * 300])
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(BundleError):
        pack_bundle({name: b"x"})


def test_garbled_container_refused() -> None:
    data = pack_bundle(files())
    for bad in [b"NOTABNDL" + data[8:], data[:-1], data + b"x", data[:20]]:
        with pytest.raises(BundleError):
            unpack_bundle(bad)
    with pytest.raises(BundleError):
        pack_bundle({})


def test_manifest_signed_and_verified(key) -> None:
    data = pack_bundle(files())
    m = make_manifest(data, 64 * KiB, key, metadata={"model": "lenet5", "eps": 0.01})
    assert m.n_chunks == -(-len(data) // (64 * KiB)) and m.signer == key_fingerprint(key.public_key())
    assert {e.name for e in m.files} == set(files())
    verify_manifest(m, key.public_key())
    # the signature survives the wire: JSON out, JSON in
    verify_manifest(parse_message("manifest", encode(m)), key.public_key())
    assert b"signature" not in canonical_manifest_bytes(m)
    for i in range(m.n_chunks):
        assert accept_chunk(m, i, chunk_bytes(data, m, i)) is ChunkCheck.OK
    with pytest.raises(BundleError):
        chunk_bytes(data, m, m.n_chunks)


def test_tampering_and_bad_keys_refused(key) -> None:
    data = pack_bundle(files())
    m = make_manifest(data, 64 * KiB, key)
    tampered = [m.model_copy(update={"metadata": {"model": "evil"}}),
                m.model_copy(update={"chunks": [m.chunks[1]] + m.chunks[1:]}),
                m.model_copy(update={"size": m.size})]  # identical copy: control, must pass
    with pytest.raises(BundleError, match="bad signature"):
        verify_manifest(tampered[0], key.public_key())
    with pytest.raises(BundleError, match="bad signature"):
        verify_manifest(tampered[1], key.public_key())
    verify_manifest(tampered[2], key.public_key())
    with pytest.raises(BundleError, match="unsigned"):
        verify_manifest(m.model_copy(update={"signature": None}), key.public_key())
    with pytest.raises(BundleError, match="not base64"):
        verify_manifest(m.model_copy(update={"signature": "!!!"}), key.public_key())
    other = generate_private_key()
    with pytest.raises(BundleError, match="expected"):
        verify_manifest(m, other.public_key())
    resigned = make_manifest(data, 64 * KiB, other)  # a valid signature by the wrong key
    with pytest.raises(BundleError):
        verify_manifest(resigned, key.public_key())


def test_corrupt_chunks_and_whole_bundle(key) -> None:
    data = pack_bundle(files())
    m = make_manifest(data, 64 * KiB, key)
    good = chunk_bytes(data, m, 2)
    flipped = bytes([good[0] ^ 1]) + good[1:]
    assert accept_chunk(m, 2, flipped) is ChunkCheck.HASH_MISMATCH
    assert accept_chunk(m, 2, good[:-1]) is ChunkCheck.WRONG_SIZE
    assert accept_chunk(m, m.n_chunks, good) is ChunkCheck.OUT_OF_RANGE
    last = m.n_chunks - 1
    assert accept_chunk(m, last, chunk_bytes(data, m, last)) is ChunkCheck.OK  # the short last chunk
    verify_assembled(m, data)
    with pytest.raises(TransferError, match="sha256"):
        verify_assembled(m, data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(TransferError, match="bytes"):
        verify_assembled(m, data[:-1])


def test_bitmap_state_round_trip() -> None:
    b = ChunkBitmap(13)
    for i in (0, 5, 12):
        b.set(i)
    back = ChunkBitmap.from_dict(json.loads(json.dumps(b.to_dict())))
    assert [back.has(i) for i in range(13)] == [i in (0, 5, 12) for i in range(13)]
    assert back.count == 3 and not back.complete
    assert missing_chunks(back, limit=3) == [1, 2, 3]
    assert missing_chunks(back, limit=3, skip={1, 2}) == [3, 4, 6]
    back.clear(5)
    assert not back.has(5)
    for i in range(13):
        back.set(i)
    assert back.complete and missing_chunks(back) == []
    with pytest.raises(TransferError):
        back.set(13)
    with pytest.raises(TransferError):
        ChunkBitmap.from_dict({"n": 13, "bits": base64.b64encode(b"\x00").decode()})


def test_space_check(key) -> None:
    m = make_manifest(pack_bundle(files()), 64 * KiB, key)
    assert fits(m, free_disk=10**9, free_mem=10**9).ok
    no_disk = fits(m, free_disk=m.size, free_mem=10**9)
    assert not no_disk.ok and no_disk.reason is FailureReason.NO_DISK and "disk" in no_disk.detail
    no_mem = fits(m, free_disk=10**9, free_mem=1000)
    assert no_mem.reason is FailureReason.NO_MEMORY


def test_keys_saved_with_restricted_permissions(tmp_path, key) -> None:
    priv, pub = tmp_path / "keys" / "server.key", tmp_path / "keys" / "server.pub"
    old = os.umask(0)  # even a permissive umask must not widen the private key
    try:
        save_private_key(key, priv)
        save_public_key(key, pub)
    finally:
        os.umask(old)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert public_key_raw(load_private_key(priv).public_key()) == public_key_raw(key.public_key())
    raw = public_key_raw(key.public_key())
    for source in (pub, pub.read_bytes(), raw, raw.hex().encode()):
        assert public_key_raw(load_public_key(source)) == raw
    for bad in (b"garbage", priv.read_bytes()):
        with pytest.raises(BundleError):
            load_public_key(bad)
    with pytest.raises(BundleError):
        load_private_key(pub)


def test_manifest_requires_sane_chunk_size(key) -> None:
    data = pack_bundle(files())
    for size in (1024, 512 * KiB):
        with pytest.raises(BundleError, match="chunk size"):
            make_manifest(data, size, key)
    with pytest.raises(BundleError):
        make_manifest(b"not a bundle at all", 64 * KiB, key)
    with pytest.raises(BundleError, match="cannot be signed"):
        make_manifest(data, 64 * KiB, key, metadata={"x": float("nan")})
