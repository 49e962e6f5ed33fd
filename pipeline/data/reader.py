"""Read one whole chunk of one cache array: into a caller's buffer straight from the chunk file
when uncompressed (one readinto, no decode, the GIL released), through zarr otherwise; or map it
into a WindowMap slot (uncompressed only)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import zarr

from cache_schema import TOKENS, Manifest, array_specs, chunk_file
from pipeline.data.mapping import WindowMap
from pipeline.errors import PipelineError
from pipeline.remote import fetcher


class ChunkReader:
    """Chunk reads of one cache. `reads` counts them (tests check what a resume skips)."""

    def __init__(self, root: str | Path, m: Manifest):
        self.root, self.m = Path(root), m
        self._fetch = fetcher(self.root)  # remote caches: download a chunk file on first read
        self._specs = array_specs(m)
        self._zarr: dict[str, zarr.Array] = {}
        self._lock = threading.Lock()
        self.reads = 0
        self.log: list[tuple[str, int]] | None = None
        """Set to a list to record (array, chunk) of every read from then on (tests)."""

    def _path(self, array: str, ndim: int, k: int) -> Path:
        path = chunk_file(self.root, array, ndim, k)
        if self._fetch is not None:
            self._fetch(path)
        return path

    def _count(self, array: str, k: int) -> None:
        with self._lock:
            self.reads += 1
            if self.log is not None:
                self.log.append((array, k))

    def read(self, array: str, k: int, out: np.ndarray) -> None:
        """Fill `out` (the chunk's rows, C-contiguous, of the array's on-disk itemsize) with
        chunk k of `array`. bfloat16 arrays (uint16 on disk) may be read into any 2-byte dtype."""
        self._count(array, k)
        path = self._path(array, out.ndim, k)
        if self.m.codec != "none" and len(self._specs[array][0]) == 2:  # tokens: never compressed
            self._read_zarr(array, k, path, out)
            return
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size != out.nbytes or f.readinto(memoryview(out.reshape(-1).view(np.uint8))
                                                    ) != size:
                    raise _wrong_size(array, k, path, size, out.nbytes)
        except FileNotFoundError:
            raise _missing(array, k, path) from None

    def map_into(self, window: WindowMap, slot: int, array: str, k: int) -> None:
        """Map chunk k of an uncompressed activation array into a slot of `window`."""
        self._count(array, k)
        path = self._path(array, 2, k)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise _missing(array, k, path) from None
        if size != window.chunk_bytes:  # reading a mapping past the end of a file would crash
            raise _wrong_size(array, k, path, size, window.chunk_bytes)
        window.place(slot, path)

    def _read_zarr(self, array: str, k: int, path: Path, out: np.ndarray) -> None:
        if not path.is_file():  # zarr would read a missing chunk as zeros
            raise _missing(array, k, path)
        with self._lock:
            if array not in self._zarr:
                self._zarr[array] = zarr.open_array(str(self.root / array), mode="r")
            arr = self._zarr[array]
        lo = k * self.m.rows_per_chunk
        try:
            data = arr[lo:lo + len(out)]
        except Exception as e:  # a codec error names neither the file nor the chunk
            raise PipelineError(f"chunk {k} of {array} ({path}) could not be decoded ({e}): "
                                "truncated or corrupt; run `pipeline verify`") from e
        out[...] = data.view(out.dtype)  # bfloat16: uint16 on disk, int16 in torch buffers

    def tokens(self, k: int) -> np.ndarray:
        """Clean token ids of chunk k."""
        out = np.empty(self.m.rows_per_chunk, dtype=self._specs[TOKENS][1])
        self.read(TOKENS, k, out)
        return out


def _missing(array: str, k: int, path: Path) -> PipelineError:
    return PipelineError(f"chunk {k} of {array} is missing ({path}): the cache is incomplete "
                         "or damaged; run `pipeline verify`")


def _wrong_size(array: str, k: int, path: Path, size: int, expected: int) -> PipelineError:
    return PipelineError(f"chunk {k} of {array} ({path}) has {size} bytes where {expected} "
                         "were expected: truncated or corrupt; run `pipeline verify`")
