"""Keep freed host memory in the process between training steps (glibc only).

A CPU step allocates and frees the same temporaries every step (activations, gradients, Adam's
views). glibc serves blocks above its mmap threshold (128 KiB, raised on the fly up to 32 MiB)
with fresh mmaps and gives them back to the kernel when freed, and trims the top of its heap the
same way, so every step page-faults its temporaries in again and the kernel zeroes each page
first (scripts/bench_allocator.py measures a step with and without). Raising both thresholds
keeps those blocks on glibc's free lists, where the next step finds them; the process's resident
size stays near its peak instead of shrinking between steps. PIPELINE_KEEP_FREED_MEMORY=0 in the
environment leaves glibc's defaults alone."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap, and up to 1 GiB free stays there

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to KEEP_BYTES, once per process. Returns whether
    they are raised (False off Linux, where the C library is not glibc, or when turned off)."""
    global _done
    if os.environ.get("PIPELINE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if _done is None:
        _done = _mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) and _mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
    return _done


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(param, value) == 1
