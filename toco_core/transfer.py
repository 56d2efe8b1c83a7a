"""Download bookkeeping for chunked bundles: which chunks are here, is a chunk good, does it fit.

Pure functions and a small bitmap type; the agent's downloader does the I/O around them.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from toco_core.errors import TransferError
from toco_core.messages import BundleManifest, FailureReason
from toco_core.units import format_size


class ChunkBitmap:
    """One bit per chunk: set when the chunk is verified and stored."""

    def __init__(self, n: int, bits: bytes | None = None) -> None:
        if n < 1:
            raise TransferError(f"a bitmap needs at least one chunk, got {n}", "check the manifest")
        size = (n + 7) // 8
        if bits is not None and len(bits) != size:
            raise TransferError(f"bitmap of {len(bits)} bytes does not hold {n} chunks", "delete the partial download")
        self.n = n
        self._bits = bytearray(bits if bits is not None else size)

    def _check(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise TransferError(f"chunk {i} is outside 0..{self.n - 1}", "request indices from the manifest")

    def set(self, i: int) -> None:
        """Mark chunk ``i`` present. Raises TransferError for an index out of range."""
        self._check(i)
        self._bits[i >> 3] |= 1 << (i & 7)

    def clear(self, i: int) -> None:
        """Mark chunk ``i`` missing. Raises TransferError for an index out of range."""
        self._check(i)
        self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def has(self, i: int) -> bool:
        """Whether chunk ``i`` is present."""
        self._check(i)
        return bool(self._bits[i >> 3] >> (i & 7) & 1)

    @property
    def count(self) -> int:
        """Number of chunks present."""
        return sum(bin(b).count("1") for b in self._bits)

    @property
    def complete(self) -> bool:
        """True when every chunk is present."""
        return self.count == self.n

    def to_dict(self) -> dict[str, Any]:
        """``{"n": n, "bits": base64}`` for a JSON state file."""
        return {"n": self.n, "bits": base64.b64encode(bytes(self._bits)).decode()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChunkBitmap:
        """Inverse of to_dict. Raises TransferError for a malformed dict."""
        try:
            return cls(int(d["n"]), base64.b64decode(d["bits"], validate=True))
        except (KeyError, TypeError, ValueError) as exc:
            raise TransferError(f"bitmap state is malformed: {exc}", "delete the partial download") from None


def missing_chunks(bitmap: ChunkBitmap, limit: int | None = None,
                   skip: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Indices not yet present (and not in ``skip``), ascending, at most ``limit`` of them."""
    out = []
    for i in range(bitmap.n):
        if not bitmap.has(i) and i not in skip:
            out.append(i)
            if limit is not None and len(out) >= limit:
                break
    return out


class ChunkCheck(StrEnum):
    """Verdict on one received chunk."""

    OK = "ok"
    OUT_OF_RANGE = "out_of_range"
    WRONG_SIZE = "wrong_size"
    HASH_MISMATCH = "hash_mismatch"


def accept_chunk(manifest: BundleManifest, i: int, data: bytes) -> ChunkCheck:
    """Check chunk ``i`` against the manifest: index in range, expected length, sha256 equal."""
    if not 0 <= i < manifest.n_chunks:
        return ChunkCheck.OUT_OF_RANGE
    if len(data) != manifest.chunk_len(i):
        return ChunkCheck.WRONG_SIZE
    if hashlib.sha256(data).hexdigest() != manifest.chunks[i]:
        return ChunkCheck.HASH_MISMATCH
    return ChunkCheck.OK


def verify_assembled(manifest: BundleManifest, data: bytes) -> None:
    """Final check of the whole downloaded bundle: size and sha256 equal the manifest's bundle_id.

    Raises TransferError (reason bundle_hash_mismatch) otherwise. No cryptography here: the
    agent daemon calls this and must not load it (agent.child_tasks checks signatures).
    """
    if len(data) != manifest.size:
        raise TransferError(f"bundle is {len(data)} bytes, the manifest says {manifest.size}", "download it again")
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.bundle_id:
        raise TransferError(f"bundle sha256 {digest[:12]} does not match its id {manifest.bundle_id[:12]}",
                            "download it again")


@dataclass(frozen=True)
class SpaceCheck:
    """Answer of ``fits``: ok, or the reason and a sentence with the numbers."""

    ok: bool
    disk_needed: int
    mem_needed: int
    reason: FailureReason | None = None
    detail: str = ""


OPTIONAL_PARTS = frozenset({"base"})  # parts a box never fetches by default (the fp32 model)


def download_size(manifest: BundleManifest) -> int:
    """The most a box downloads of a bundle: the whole container (format 1), or for a parts bundle
    (a ``head`` part) every part but the optional ones: what its roomiest plan fetches."""
    if not any(f.name == "head" for f in manifest.files):
        return manifest.size
    return sum(f.size for f in manifest.files if f.name not in OPTIONAL_PARTS)


def fits(manifest: BundleManifest, free_disk: int, free_mem: int, disk_factor: float = 2.0,
         mem_factor: float = 1.0, reserve: int = 16 * 1024 * 1024) -> SpaceCheck:
    """Whether a bundle can be downloaded and used here; its size is ``download_size``.

    disk_needed = disk_factor * size + reserve  (the partial download plus the unpacked slot copy);
    mem_needed  = mem_factor * size + reserve   (the verified bundle is handed over in memory).
    """
    size = download_size(manifest)
    disk = int(size * disk_factor) + reserve
    mem = int(size * mem_factor) + reserve
    if disk > free_disk:
        return SpaceCheck(False, disk, mem, FailureReason.NO_DISK,
                          f"bundle of {format_size(size)} needs {format_size(disk)} of disk, "
                          f"{format_size(free_disk)} free")
    if mem > free_mem:
        return SpaceCheck(False, disk, mem, FailureReason.NO_MEMORY,
                          f"bundle of {format_size(size)} needs {format_size(mem)} of memory, "
                          f"{format_size(free_mem)} available")
    return SpaceCheck(True, disk, mem)
