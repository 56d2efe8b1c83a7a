"""Bundles: named files packed into one deterministic byte string, with a signed manifest.

Container (all integers big-endian)::

    b"TOCOBND1"                          magic + format version
    u32  file count
    per file, sorted by name:  u16 name length, name (UTF-8), u64 size
    the file contents, concatenated in the same order

Names are relative POSIX paths ("model.onnx", "analysis/tolerance.safetensors") without
"..", empty parts or backslashes. The same files always give the same bytes, so
``bundle_id = sha256(packed bytes)`` names the content.

The manifest's signature is Ed25519 over ``canonical_manifest_bytes``: the manifest's JSON
without ``signature``, keys sorted, no spaces, UTF-8.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from toco_core.atomic_files import atomic_write
from toco_core.errors import BundleError, TransferError
from toco_core.messages import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, BundleManifest, FileEntry
from toco_core.transfer import verify_assembled

__all__ = ["BundleManifest", "FileEntry", "pack_bundle", "unpack_bundle", "make_manifest", "sign_manifest",
           "canonical_manifest_bytes", "verify_manifest", "verify_bundle_bytes", "chunk_bytes",
           "generate_private_key", "save_private_key", "save_public_key", "load_private_key",
           "load_public_key", "public_key_raw", "key_fingerprint", "DEFAULT_CHUNK_SIZE"]

MAGIC = b"TOCOBND1"
DEFAULT_CHUNK_SIZE = 256 * 1024
_MAX_NAME = 255


def _check_name(name: str) -> bytes:
    parts = name.split("/")
    if (not name or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in parts)):
        raise BundleError(f"bundle file name {name!r} is not a plain relative path",
                          "use names like 'model.onnx' or 'analysis/tolerance.safetensors'")
    raw = name.encode("utf-8")
    if len(raw) > _MAX_NAME:
        raise BundleError(f"bundle file name {name[:40]!r}... is longer than {_MAX_NAME} bytes", "shorten it")
    return raw


def _layout(files: Mapping[str, bytes]) -> tuple[bytes, list[tuple[str, bytes]]]:
    entries = sorted(((_check_name(n), n, bytes(d)) for n, d in files.items()), key=lambda e: e[0])
    header = [MAGIC, struct.pack(">I", len(entries))]
    for raw, _, data in entries:
        header += [struct.pack(">H", len(raw)), raw, struct.pack(">Q", len(data))]
    return b"".join(header), [(n, d) for _, n, d in entries]


def pack_bundle(files: Mapping[str, bytes]) -> bytes:
    """Pack ``{name: bytes}`` into the container above; the same files always give the same bytes.

    Raises BundleError for an empty mapping or a name that is not a plain relative path.
    """
    if not files:
        raise BundleError("a bundle needs at least one file", "add model.onnx")
    header, ordered = _layout(files)
    return header + b"".join(d for _, d in ordered)


def _read_index(data: bytes) -> list[tuple[str, int, int]]:
    """``[(name, offset, size)]`` of a packed bundle; raises BundleError when malformed."""
    view = memoryview(data)
    if view[: len(MAGIC)] != MAGIC:
        raise BundleError("not a TOCO bundle (bad magic)", "the download is corrupt or not a bundle")
    try:
        (count,) = struct.unpack_from(">I", view, len(MAGIC))
        pos, heads = len(MAGIC) + 4, []
        for _ in range(count):
            (nlen,) = struct.unpack_from(">H", view, pos)
            name = bytes(view[pos + 2 : pos + 2 + nlen]).decode("utf-8")
            (size,) = struct.unpack_from(">Q", view, pos + 2 + nlen)
            pos += 2 + nlen + 8
            heads.append((name, size))
    except (struct.error, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle header is truncated or garbled: {exc}", "download the bundle again") from None
    index, offset = [], pos
    for name, size in heads:
        _check_name(name)
        index.append((name, offset, size))
        offset += size
    if offset != len(data):
        raise BundleError(f"bundle is {len(data)} bytes but its header describes {offset}", "download it again")
    names = [n.encode() for n, _, _ in index]
    if names != sorted(set(names)):
        raise BundleError("bundle file names are duplicated or out of order", "repack it with pack_bundle")
    return index


def unpack_bundle(data: bytes) -> dict[str, bytes]:
    """Inverse of pack_bundle. Raises BundleError for bad magic, truncation or a bad name table."""
    return {name: bytes(data[off : off + size]) for name, off, size in _read_index(data)}


def make_manifest(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, private_key: Ed25519PrivateKey | None = None,
                  metadata: dict[str, Any] | None = None, created_at: float | None = None, *,
                  model_id: str | None = None, sequence: int | None = None) -> BundleManifest:
    """Manifest of packed bundle bytes, signed when ``private_key`` is given.

    ``model_id`` and ``sequence`` are the anti-rollback pair (per model, monotonic; signed).

    bundle_id = sha256(data); chunk i = data[i*chunk_size : (i+1)*chunk_size] with its sha256.
    Raises BundleError for a chunk size outside 64-256 KiB, bytes that are not a bundle, or
    metadata that is not plain JSON with finite numbers.
    """
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise BundleError(f"chunk size {chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes",
                          "pick 64-256 KiB")
    try:
        json.dumps(metadata or {}, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"manifest metadata cannot be signed: {exc}", "use JSON values with finite numbers") from None
    files = [FileEntry(name=n, offset=o, size=s, sha256=hashlib.sha256(data[o : o + s]).hexdigest())
             for n, o, s in _read_index(data)]
    view = memoryview(data)
    chunks = [hashlib.sha256(view[i : i + chunk_size]).hexdigest() for i in range(0, len(data), chunk_size)]
    manifest = BundleManifest(bundle_id=hashlib.sha256(data).hexdigest(), size=len(data), chunk_size=chunk_size,
                              chunks=chunks, files=files, created_at=time.time() if created_at is None else created_at,
                              metadata=dict(metadata or {}), model_id=model_id, sequence=sequence)
    return sign_manifest(manifest, private_key) if private_key is not None else manifest


def canonical_manifest_bytes(manifest: BundleManifest) -> bytes:
    """The signed bytes: manifest JSON without ``signature``, sorted keys, compact, UTF-8.

    Raises BundleError when the metadata holds values JSON cannot carry exactly (NaN, inf).
    """
    # Fields added after the first signed manifests are left out while unset, so a manifest signed
    # before they existed still verifies.
    later = {name for name in ("model_id", "sequence") if getattr(manifest, name) is None}
    body = manifest.model_dump(mode="json", exclude={"signature", *later})
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError as exc:
        raise BundleError(f"manifest metadata cannot be signed: {exc}", "use finite numbers and strings") from None


def sign_manifest(manifest: BundleManifest, private_key: Ed25519PrivateKey) -> BundleManifest:
    """Return a copy with ``signer`` = the key's fingerprint and ``signature`` = Ed25519(canonical bytes)."""
    unsigned = manifest.model_copy(update={"signer": key_fingerprint(private_key.public_key()), "signature": None})
    sig = private_key.sign(canonical_manifest_bytes(unsigned))
    return unsigned.model_copy(update={"signature": base64.b64encode(sig).decode()})


def verify_manifest(manifest: BundleManifest, public_key: Ed25519PublicKey) -> None:
    """Check the manifest's Ed25519 signature against the provisioned public key.

    Raises BundleError when it is unsigned, the signature is garbled, or it does not verify.
    """
    if not manifest.signature:
        raise BundleError(f"bundle {manifest.bundle_id[:12]} is unsigned",
                          "only deploy bundles signed by the fleet server")
    try:
        sig = base64.b64decode(manifest.signature, validate=True)
    except ValueError:
        raise BundleError(f"bundle {manifest.bundle_id[:12]} has a signature that is not base64",
                          "re-sign it") from None
    expected = key_fingerprint(public_key)
    try:
        public_key.verify(sig, canonical_manifest_bytes(manifest))
    except InvalidSignature:
        who = "" if manifest.signer in (None, expected) else f" (signed by key {manifest.signer}, expected {expected})"
        raise BundleError(f"bundle {manifest.bundle_id[:12]} has a bad signature{who}",
                          "check the agent's provisioned public key and the bundle's origin") from None


def verify_bundle_bytes(data: bytes, manifest: BundleManifest) -> None:
    """Whole-bundle check: length and sha256 must match the manifest. Raises BundleError otherwise."""
    try:
        verify_assembled(manifest, data)
    except TransferError as exc:
        raise BundleError(exc.message, exc.hint) from None


def chunk_bytes(data: bytes, manifest: BundleManifest, i: int) -> bytes:
    """Bytes of chunk ``i``. Raises BundleError for an index outside 0..n_chunks-1."""
    if not 0 <= i < manifest.n_chunks:
        raise BundleError(f"chunk {i} does not exist; bundle {manifest.bundle_id[:12]} has {manifest.n_chunks}",
                          "request indices from the manifest")
    start = i * manifest.chunk_size
    return bytes(data[start : start + manifest.chunk_size])


def generate_private_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key."""
    return Ed25519PrivateKey.generate()


def public_key_raw(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256(raw public key): a short name for log lines and manifests."""
    return hashlib.sha256(public_key_raw(key)).hexdigest()[:16]


def _write_key(path: Path, pem: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, pem, mode)


def save_private_key(key: Ed25519PrivateKey, path: str | Path) -> None:
    """Write the key as unencrypted PKCS8 PEM with permissions 0600 (atomic replace)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_key(Path(path), pem, 0o600)


def save_public_key(key: Ed25519PublicKey | Ed25519PrivateKey, path: str | Path) -> None:
    """Write the public key as SubjectPublicKeyInfo PEM with permissions 0644."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_key(Path(path), pem, 0o644)


def load_private_key(source: str | Path | bytes) -> Ed25519PrivateKey:
    """Load a PEM private key from a path or bytes. Raises BundleError if it is not Ed25519 PEM."""
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"cannot read the signing key: {exc}", "give an unencrypted Ed25519 PEM file") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"the signing key is {type(key).__name__}, not Ed25519",
                          "generate one with generate_private_key")
    return key


def load_public_key(source: str | Path | bytes) -> Ed25519PublicKey:
    """Load a public key from a path or bytes: PEM, 32 raw bytes, or 64 hex digits.

    Raises BundleError when it is none of these or not an Ed25519 key.
    """
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
        elif len(text) == 64:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode()))
        elif len(data) == 32:
            key = Ed25519PublicKey.from_public_bytes(data)
        else:
            raise ValueError(f"{len(data)} bytes is neither PEM, 32 raw bytes nor 64 hex digits")
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read the bundle public key: {exc}",
                          "provision the server's public key PEM") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"the bundle public key is {type(key).__name__}, not Ed25519", "provision the Ed25519 key")
    return key
