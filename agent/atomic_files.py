"""Crash-safe small files: a reader (or a restart after kill -9) sees the old file or the new one, never half.

Every file the agent's state lives in (the slot pointer, slot metadata, status.json, download
bitmaps, job journals) is written this way.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that the names created or renamed in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: temp file, fsync, rename over the old file, fsync the folder.

    Raises OSError (a full disk, say); the old file is then untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
