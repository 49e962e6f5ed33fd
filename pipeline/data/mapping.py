"""A window of uncompressed chunk files memory-mapped back to back in one address range (Linux),
so that batches are gathered straight from the page cache: one copy instead of read + gather.

One range of window_chunks x chunk_bytes is reserved once (anonymous, no access); placing chunk
file f at slot i maps f over [i*chunk_bytes, (i+1)*chunk_bytes) of it with MAP_FIXED (replacing
what was there) and MAP_POPULATE (the placing thread takes the page faults and the disk reads,
not the thread that gathers). Needs chunk_bytes to be a multiple of the page size; otherwise, or
off Linux, the loader reads into an ordinary buffer instead.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np

_PROT_NONE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_POPULATE = 0, 0x10, 0x20, 0x8000  # Linux (x86, arm)
_FAILED = ctypes.c_void_p(-1).value


def _libc():
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_LIBC = _libc()


def mapping_supported(chunk_bytes: int) -> bool:
    """Can chunks of this many bytes be mapped back to back here."""
    return _LIBC is not None and chunk_bytes > 0 and chunk_bytes % mmap.PAGESIZE == 0


class WindowMap:
    """`array` ([slots * rows, *row_shape] of dtype) shows the files placed in its slots."""

    def __init__(self, slots: int, rows: int, row_shape: tuple[int, ...], dtype: np.dtype):
        self.chunk_bytes = rows * int(np.prod(row_shape)) * np.dtype(dtype).itemsize
        if not mapping_supported(self.chunk_bytes):
            raise ValueError(f"chunks of {self.chunk_bytes} bytes cannot be mapped here")
        self.size = slots * self.chunk_bytes
        addr = _LIBC.mmap(None, self.size, _PROT_NONE, mmap.MAP_PRIVATE | _MAP_ANONYMOUS,
                          -1, 0)
        if addr in (None, _FAILED):
            raise OSError(ctypes.get_errno(), f"reserving {self.size} bytes of address space")
        self.addr: int | None = addr
        raw = (ctypes.c_char * self.size).from_address(addr)
        self.array = np.frombuffer(raw, dtype=dtype).reshape(slots * rows, *row_shape)

    def place(self, slot: int, path: str | os.PathLike) -> None:
        """Map the whole file (exactly chunk_bytes long: the caller checks) into `slot`."""
        assert self.addr is not None, "the window map is closed"
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):  # cold file: one large read-ahead, not page by page
                os.posix_fadvise(fd, 0, self.chunk_bytes, os.POSIX_FADV_WILLNEED)
            at = self.addr + slot * self.chunk_bytes
            got = _LIBC.mmap(at, self.chunk_bytes, mmap.PROT_READ,
                             mmap.MAP_SHARED | _MAP_FIXED | _MAP_POPULATE, fd, 0)
            if got != at:
                raise OSError(ctypes.get_errno(), f"mapping {path}")
        finally:
            os.close(fd)

    def slot_view(self, slot: int) -> np.ndarray:
        """The bytes of one slot (valid while the slot's file stays mapped)."""
        rows = self.array.shape[0] * self.chunk_bytes // self.size
        return self.array[slot * rows:(slot + 1) * rows].reshape(-1).view(np.uint8)

    def close(self) -> None:
        """Unmap everything; `array` must not be used afterwards."""
        if self.addr is not None:
            _LIBC.munmap(self.addr, self.size)
            self.addr = None
