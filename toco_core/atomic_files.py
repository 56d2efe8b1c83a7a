"""Crash-safe files: a reader (or a restart after kill -9) sees the old file or the new one, never half.

The one atomic write of the project: the agent's state (slot pointer and metadata, status.json,
download bitmaps, job journals, birth counter), the server's bundles and keys, and the analysis
manifest are all written this way.
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


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path``: temp file, fsync, rename over the old file, fsync the folder.

    ``mode`` sets the file's permissions exactly (the umask neither widens nor narrows them), for
    keys; None keeps the process's defaults. Raises OSError (a full disk, say); the old file is
    then untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
