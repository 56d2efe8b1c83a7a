"""A sealed blob: magic, format version, payload length and the payload's SHA-256 ahead of it.

The storage form of a compressed model and the calibration samples share this envelope, so a
truncated, padded, foreign or damaged blob is refused the same way before anything decodes it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from toco_core.errors import BundleError


@dataclass(frozen=True)
class SealedFormat:
    """One envelope: ``header`` packs (magic, version, payload length, sha256); ``what`` names the
    blob in messages, ``writer`` the function that writes it, ``refetch`` what to do on damage."""

    magic: bytes
    version: int
    readable: tuple[int, ...]
    header: struct.Struct
    what: str
    writer: str
    refetch: str
    reencode: str

    def seal(self, payload: bytes) -> bytes:
        """The envelope at the current version around ``payload``."""
        return self.header.pack(self.magic, self.version, len(payload), hashlib.sha256(payload).digest()) + payload

    def open(self, blob: bytes) -> bytes:
        """The payload after checking size, magic, version, length and hash.

        Raises BundleError saying which check failed and what to do.
        """
        size = self.header.size
        if len(blob) < size:
            raise BundleError(f"{self.what} is truncated: {len(blob)} bytes, the header alone is {size}", self.refetch)
        magic, version, length, digest = self.header.unpack_from(blob)
        if magic != self.magic:
            raise BundleError(f"not a TOCO {self.what} (bad magic bytes)", f"pass bytes written by {self.writer}")
        if version not in self.readable:
            raise BundleError(f"{self.what} format version {version} is not supported (this is {self.version})",
                              f"update the agent or {self.reencode}")
        payload = bytes(memoryview(blob)[size:])
        if len(payload) != length:
            raise BundleError(f"{self.what} is truncated or padded: payload {len(payload)} bytes, header says {length}",
                              self.refetch)
        if hashlib.sha256(payload).digest() != digest:
            raise BundleError(f"{self.what} is corrupt (SHA-256 mismatch)", self.refetch)
        return payload
