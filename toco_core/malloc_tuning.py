"""glibc malloc settings for long analyses that create and free hundreds of onnxruntime sessions.

glibc serves blocks above ``M_MMAP_THRESHOLD`` with their own mmap, returned to the kernel on
free. By default the threshold is dynamic: each time a mmapped block is freed, the threshold
rises to that block's size (up to 32 MiB on 64-bit). An analysis's calibration grid builds and
drops ~400 sessions whose weights and activation arenas are blocks of 1-30 MiB, so after the
first few the threshold sits at tens of MiB, later blocks of that size come from the heap, and
freed heap memory in the middle of an arena is never returned: RSS creeps up point after point
(measured on the 224x224 RGB model: 1,005 -> 1,127 MiB between grid points). Fixing the
threshold also turns the adjustment off, so large blocks keep going back to the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameter number, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
#: blocks at or above this size get their own mmap; above the largest activation of a digit
#: model's batch, below the weight and arena blocks of a 224x224 model
MMAP_THRESHOLD_BYTES = 1 << 20

_applied: set[int] = set()


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (has ``mallopt``), else None (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (idempotent).

    Takes the threshold in bytes (> 0). Returns True when glibc accepted it (now or on an
    earlier call with the same value), False where the C library is not glibc or refused it;
    nothing else changes then, so callers need not care. Raises ValueError for a threshold <= 0.
    """
    if threshold <= 0:
        raise ValueError(f"mmap threshold must be a positive number of bytes, got {threshold}")
    if threshold in _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold)))
    if ok:
        _applied.clear()
        _applied.add(threshold)
        log.debug("malloc: mmap threshold fixed at %d bytes", threshold)
    else:
        log.debug("malloc: glibc refused mmap threshold %d", threshold)
    return ok
