"""One bundle download's state: its folder on disk (what survives a restart) and its requests in flight.

Per bundle, under ``{state_dir}/downloads/{bundle_id}/``: ``job.json`` (the deployment id),
``manifest.json`` (as received and verified), ``data.part`` (the bundle, chunks written at their
offsets) and ``bitmap.json`` (chunks verified and fsynced; written after the data, so it never
claims a chunk that is not on disk). A restart or reconnect requests only what the bitmap lacks.

Not thread-safe: agent.bundle_download holds its lock around every call.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from toco_core.atomic_files import atomic_write
from toco_core.errors import TransferError
from toco_core.messages import BundleManifest, MessageError, MessageKind, parse_message
from toco_core.rerequest import QuietTimer
from toco_core.transfer import ChunkBitmap

log = logging.getLogger("toco.agent.download")


def saved_jobs(root: Path) -> Iterator[tuple[str, str | None]]:
    """Yield (bundle id, deployment id) of every download an earlier run left under ``root``.

    A generator on purpose: the caller resumes each download before the next ``job.json`` is read.
    Raises OSError or ValueError for an unreadable ``job.json``.
    """
    for d in sorted(root.iterdir()):
        if (d / "job.json").exists():
            yield d.name, json.loads((d / "job.json").read_text()).get("deployment_id")


@dataclass
class DownloadJob:
    """One download in progress: its files, its bitmap once the manifest is known, and its chunk requests."""

    bundle_id: str
    deployment_id: str | None
    dir: Path
    manifest: BundleManifest | None = None
    bitmap: ChunkBitmap | None = None
    fd: int | None = None
    inflight: dict[int, float] = field(default_factory=dict)  # chunk index -> time.monotonic() of its request
    retries: Counter[int] = field(default_factory=Counter)
    timer: QuietTimer = field(default_factory=QuietTimer)  # when to ask again for the chunks in flight
    connection: int = 0  # the link connection its last request went out on (MqttLink.connection)
    unsynced: int = 0  # chunks written but not yet fsynced and recorded in bitmap.json
    reported: int = -1  # last progress decile reported

    @classmethod
    def create(cls, root: Path, bundle_id: str, deployment_id: str | None) -> DownloadJob:
        """Make (or keep) the folder ``root/bundle_id`` and record the deployment id in it. Raises OSError."""
        job = cls(bundle_id, deployment_id, root / bundle_id)
        job.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(job.dir / "job.json", json.dumps({"deployment_id": deployment_id}).encode())
        return job

    def saved_manifest(self) -> BundleManifest | None:
        """The verified manifest an earlier run saved here, or None.

        An unreadable one is deleted together with the bitmap: starting over is safer than
        trusting a bitmap of unknown layout. Raises OSError when the folder cannot be read.
        """
        saved = self.dir / "manifest.json"
        if not saved.exists():
            return None
        try:
            return parse_message(MessageKind.MANIFEST, saved.read_bytes())
        except MessageError:
            saved.unlink()
            (self.dir / "bitmap.json").unlink(missing_ok=True)
            return None

    def open(self, manifest: BundleManifest) -> None:
        """Adopt the verified ``manifest``: save it, open ``data.part`` at the bundle's size and load the bitmap.

        A saved bitmap of another chunk count, or none at all, starts an empty one. Raises OSError.
        """
        self.manifest = manifest
        atomic_write(self.dir / "manifest.json", manifest.model_dump_json().encode())
        part = self.dir / "data.part"
        self.fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, manifest.size)
        try:
            saved = ChunkBitmap.from_dict(json.loads((self.dir / "bitmap.json").read_text()))
            self.bitmap = saved if saved.n == manifest.n_chunks else ChunkBitmap(manifest.n_chunks)
        except (FileNotFoundError, ValueError, TransferError):
            self.bitmap = ChunkBitmap(manifest.n_chunks)
        self.reported = self.bitmap.count * 10 // self.bitmap.n

    def write_chunk(self, index: int, data: bytes) -> None:
        """Write a verified chunk at its offset and mark it present; ``persist`` records it. Raises OSError."""
        os.pwrite(self.fd, data, index * self.manifest.chunk_size)  # type: ignore[union-attr, arg-type]
        self.bitmap.set(index)  # type: ignore[union-attr]
        self.unsynced += 1

    def persist(self) -> None:
        """fsync the data, then record the bitmap: it never claims a chunk that is not on disk. Raises OSError."""
        if self.fd is None or self.bitmap is None or not self.unsynced:
            return
        os.fdatasync(self.fd)
        atomic_write(self.dir / "bitmap.json", json.dumps(self.bitmap.to_dict()).encode())
        self.unsynced = 0

    def close_file(self) -> None:
        """Record what is on disk and close ``data.part``; never raises, and does nothing when it is not open."""
        if self.fd is not None:
            try:
                self.persist()
            except OSError as exc:  # closing must not fail; the unrecorded chunks are fetched again
                log.warning("could not record downloaded chunks", extra={"fields": {"error": str(exc)}})
            os.close(self.fd)
            self.fd = None

    def read_data(self) -> bytes:
        """The whole ``data.part`` (close it first). Raises OSError."""
        return (self.dir / "data.part").read_bytes()

    def remove(self) -> None:
        """Delete the folder and everything in it, ignoring errors."""
        shutil.rmtree(self.dir, ignore_errors=True)
