"""Read one whole chunk of one cache array into a caller's buffer: straight from the chunk file
when uncompressed (one readinto, no decode, the GIL released), through zarr otherwise."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import zarr

from cache_schema import TOKENS, Manifest, array_specs, chunk_file
from pipeline.errors import PipelineError


class ChunkReader:
    """Chunk reads of one cache. `reads` counts them (tests check what a resume skips)."""

    def __init__(self, root: str | Path, m: Manifest):
        self.root, self.m = Path(root), m
        self._specs = array_specs(m)
        self._zarr: dict[str, zarr.Array] = {}
        self._lock = threading.Lock()
        self.reads = 0
        self.log: list[tuple[str, int]] = []
        """(array, chunk) of every read, in the order they started."""

    def read(self, array: str, k: int, out: np.ndarray) -> None:
        """Fill `out` (the chunk's rows, C-contiguous, of the array's on-disk itemsize) with
        chunk k of `array`. bfloat16 arrays (uint16 on disk) may be read into any 2-byte dtype."""
        with self._lock:
            self.reads += 1
            self.log.append((array, k))
        if self.m.codec != "none" and len(self._specs[array][0]) == 2:  # tokens: never compressed
            self._read_zarr(array, k, out)
            return
        path = chunk_file(self.root, array, out.ndim, k)
        view = memoryview(out.reshape(-1).view(np.uint8))
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                n = f.readinto(view) if size == out.nbytes else -1
        except FileNotFoundError:
            raise PipelineError(f"chunk {k} of {array} is missing ({path}): the cache is "
                                "incomplete or damaged; run `pipeline verify`") from None
        if n != out.nbytes:
            raise PipelineError(f"chunk {k} of {array} ({path}) has {size} bytes where "
                                f"{out.nbytes} were expected: truncated or corrupt; run "
                                "`pipeline verify`")

    def _read_zarr(self, array: str, k: int, out: np.ndarray) -> None:
        with self._lock:
            if array not in self._zarr:
                self._zarr[array] = zarr.open_array(str(self.root / array), mode="r")
            arr = self._zarr[array]
        lo = k * self.m.rows_per_chunk
        try:
            data = arr[lo:lo + len(out)]
        except Exception as e:  # a codec error names neither file nor chunk
            path = chunk_file(self.root, array, out.ndim, k)
            raise PipelineError(f"chunk {k} of {array} ({path}) could not be decoded ({e}): "
                                "truncated or corrupt; run `pipeline verify`") from e
        out[...] = data.view(out.dtype)  # bfloat16: uint16 on disk, int16 in torch buffers

    def tokens(self, k: int) -> np.ndarray:
        """Clean token ids of chunk k."""
        out = np.empty(self.m.rows_per_chunk, dtype=self._specs[TOKENS][1])
        self.read(TOKENS, k, out)
        return out
