"""toco_core.malloc_tuning on the real glibc: a block freed early must not push later large blocks onto the heap."""

from __future__ import annotations

import subprocess
import sys

import pytest

from toco_core.malloc_tuning import fix_mmap_threshold

# Frees a 24 MiB block (glibc mmaps it; with the dynamic threshold, freeing it lifts the threshold
# to 24 MiB), then allocates 4 MiB and prints how many mmapped chunks that added (mallinfo2.hblks).
_PROBE = """
import ctypes, sys
from toco_core.malloc_tuning import fix_mmap_threshold
libc = ctypes.CDLL("libc.so.6")
names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in names]
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
libc.free(libc.malloc(24 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(4 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


def _new_mmapped_chunks(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_fixed_threshold_keeps_large_blocks_out_of_the_heap() -> None:
    # glibc's default: the freed 24 MiB block raised the threshold, so 4 MiB now comes from the heap
    assert _new_mmapped_chunks("default") == 0
    # fixed at 1 MiB: the 4 MiB block gets its own mapping and goes back to the kernel on free
    assert _new_mmapped_chunks("fixed") == 1


def test_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        fix_mmap_threshold(0)
