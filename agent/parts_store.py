"""The parts of parts bundles a box holds: verified files, and the one part being received of each.

Per bundle, under ``{state_dir}/parts/{bundle_id}/``: ``manifest.json`` (the signed manifest,
checked before it was saved), one file per verified part at its name (``head``, ``codes/3``,
``calib/heldout``: a part name is a relative path, checked against PART_NAME_PATTERN), and
for a part still arriving ``{name}.partial`` (its ranges written at their offsets) with
``{name}.ranges.json`` (the ranges fsynced, written after the data, so it never claims a range
that is not on disk). ``received.json`` counts the bytes received for the bundle, across
restarts and later fetches.

A part becomes a file at its name only after its SHA-256 and size equal the signed manifest's:
what ``have`` lists is always verified. Not thread-safe: agent.parts_fetch holds its lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from toco_core.atomic_files import atomic_write
from toco_core.errors import TransferError
from toco_core.messages import PART_NAME_PATTERN, BundleManifest, FileEntry, MessageError, MessageKind, parse_message
from toco_core.transfer import ChunkBitmap

_NAME = re.compile(PART_NAME_PATTERN)
_SUFFIXES = (".partial", ".ranges.json")
_OWN_FILES = ("manifest.json", "received.json")


def is_parts_bundle(manifest: BundleManifest) -> bool:
    """Whether a manifest is a parts bundle's (format 2: a ``head`` part) rather than a format-1 container."""
    return any(f.name == "head" for f in manifest.files)


def part_entry(manifest: BundleManifest, name: str) -> FileEntry:
    """The manifest's entry of part ``name``. Raises TransferError for a name it does not list."""
    for f in manifest.files:
        if f.name == name:
            return f
    raise TransferError(f"part {name!r} is not in bundle {manifest.bundle_id[:12]}'s manifest",
                        "ask only for parts the manifest lists")


def dir_bytes(folder: Path) -> int:
    """Sum of the sizes of every file under ``folder`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):  # removed while we walked
                total += os.lstat(os.path.join(root, f)).st_size
    return total


class PartialPart:
    """One part being received: ``{name}.partial`` written range by range, and its range bitmap."""

    def __init__(self, path: Path, size: int, range_size: int) -> None:
        """Open (or resume) the partial file of a part of ``size`` bytes. Raises OSError."""
        self.path, self.size, self.range_size = path, size, range_size
        self.partial = path.with_name(path.name + ".partial")
        self.ranges_file = path.with_name(path.name + ".ranges.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        n = max(1, -(-size // range_size))
        try:
            saved = json.loads(self.ranges_file.read_text())
            bitmap = ChunkBitmap.from_dict(saved["bitmap"])
            ok = saved.get("range_size") == range_size and bitmap.n == n
        except (FileNotFoundError, ValueError, KeyError, TypeError, TransferError):
            ok = False
        self.bitmap = bitmap if ok else ChunkBitmap(n)
        if size == 0:  # nothing to ask for (a range is at least one byte): complete as it is
            self.bitmap.set(0)
        self.fd: int | None = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, size)
        self.unsynced = 0

    def range_len(self, i: int) -> int:
        """Length of range ``i`` (the last one may be short)."""
        return min(self.range_size, self.size - i * self.range_size)

    def write(self, i: int, data: bytes) -> None:
        """Write range ``i`` at its offset and mark it present; ``persist`` records it. Raises OSError."""
        assert self.fd is not None, "written after close()"
        os.pwrite(self.fd, data, i * self.range_size)
        self.bitmap.set(i)
        self.unsynced += 1

    def persist(self) -> None:
        """fsync the data, then record the bitmap (it never claims a range not on disk). Raises OSError."""
        if self.fd is None or not self.unsynced:
            return
        os.fdatasync(self.fd)
        atomic_write(self.ranges_file, json.dumps({"range_size": self.range_size,
                                                   "bitmap": self.bitmap.to_dict()}).encode())
        self.unsynced = 0

    def close(self) -> None:
        """Record what is on disk and close the file; never raises."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # the unrecorded ranges are fetched again
            self.persist()
        os.close(self.fd)
        self.fd = None

    def finish(self, entry: FileEntry) -> bool:
        """Check the complete part against its signed size and SHA-256; a good one becomes the file at its
        name, a bad one is deleted (to be fetched again). Returns whether it was good. Raises OSError."""
        assert self.fd is not None, "finished after close()"
        os.fdatasync(self.fd)
        os.close(self.fd)
        self.fd = None
        data = self.partial.read_bytes()
        good = len(data) == entry.size and hashlib.sha256(data).hexdigest() == entry.sha256
        if good:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)
        self.ranges_file.unlink(missing_ok=True)
        return good


class PartsStore:
    """The parts of every bundle under ``{state_dir}/parts``."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir) / "parts"
        self.root.mkdir(parents=True, exist_ok=True)

    def dir(self, bundle_id: str) -> Path:
        """The folder of one bundle's parts."""
        return self.root / bundle_id

    def path(self, bundle_id: str, name: str) -> Path:
        """Where the verified part ``name`` lives. Raises TransferError for a name that is not a part name."""
        if not _NAME.fullmatch(name) or name in _OWN_FILES:
            raise TransferError(f"{name!r} is not a bundle part name", "use the names of the signed manifest")
        return self.dir(bundle_id) / name

    def save_manifest(self, manifest: BundleManifest) -> None:
        """Keep a signed manifest whose signature was checked. Raises OSError."""
        self.dir(manifest.bundle_id).mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir(manifest.bundle_id) / "manifest.json", manifest.model_dump_json().encode())

    def manifest(self, bundle_id: str) -> BundleManifest | None:
        """The saved manifest of a bundle, or None (also for an unreadable one)."""
        try:
            return parse_message(MessageKind.MANIFEST, (self.dir(bundle_id) / "manifest.json").read_bytes())
        except (OSError, MessageError):
            return None

    def has(self, bundle_id: str) -> bool:
        """Whether this box holds the manifest of a parts bundle (parts may still be missing)."""
        return (self.dir(bundle_id) / "manifest.json").exists()

    def have(self, bundle_id: str) -> set[str]:
        """Names of the verified parts held for a bundle."""
        folder = self.dir(bundle_id)
        out = set()
        for p in folder.rglob("*"):
            rel = p.relative_to(folder).as_posix()
            if p.is_file() and rel not in _OWN_FILES and not rel.endswith(_SUFFIXES) and _NAME.fullmatch(rel):
                out.add(rel)
        return out

    def read(self, bundle_id: str, names: list[str]) -> dict[str, bytes]:
        """The bytes of verified parts. Raises OSError when one is missing."""
        return {n: self.path(bundle_id, n).read_bytes() for n in names}

    def partial(self, manifest: BundleManifest, name: str, range_size: int) -> PartialPart:
        """Open (or resume) the partial file of part ``name``. Raises TransferError or OSError."""
        return PartialPart(self.path(manifest.bundle_id, name), part_entry(manifest, name).size, range_size)

    def received(self, bundle_id: str) -> int:
        """Bytes of this bundle's parts received here so far (0 when unknown)."""
        try:
            return int(json.loads((self.dir(bundle_id) / "received.json").read_text())["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def add_received(self, bundle_id: str, n: int) -> None:
        """Add ``n`` bytes to the bundle's received count. Raises OSError."""
        if n:
            atomic_write(self.dir(bundle_id) / "received.json",
                         json.dumps({"bytes": self.received(bundle_id) + n}).encode())

    def bundles(self) -> list[str]:
        """Ids of the bundles with a folder here."""
        return [p.name for p in self.root.iterdir() if p.is_dir()]

    def remove(self, bundle_id: str) -> None:
        """Delete one bundle's parts, ignoring errors."""
        shutil.rmtree(self.dir(bundle_id), ignore_errors=True)
