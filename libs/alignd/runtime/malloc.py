"""glibc malloc tuning for processes that move large buffers (weights, batches).

By default glibc serves every allocation above its mmap threshold (128 KiB,
rising dynamically) with a fresh mmap and returns it with munmap on free, so
each 1 MiB message of a weight stream costs page faults and zeroing of new
pages. Measured here (bench/NOTES.md): building 1 MiB UpdateWeights messages
ran at 608 MB/s with the defaults and 1,999 MB/s with a 64 MiB mmap
threshold. Raising the mmap and trim thresholds keeps such buffers in the heap
for reuse, at the price of RSS that does not shrink right after a transfer.

`tune_malloc()` applies this with mallopt(3) at start-up (what
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ would do from the
environment); it is a no-op on non-glibc platforms or when ALIGND_MALLOC_TUNING=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 64 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def tune_malloc() -> bool:
    """Returns True when the thresholds were set."""
    if os.environ.get("ALIGND_MALLOC_TUNING", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = (mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1) and ok
    return ok
