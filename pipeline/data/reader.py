"""Read one whole chunk of one cache array into a caller's buffer: straight from the chunk file
when uncompressed (one readinto, no decode), through zarr otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from cache_schema import TOKENS, Manifest, chunk_file
from pipeline.errors import PipelineError


class ChunkReader:
    def __init__(self, root: str | Path, m: Manifest):
        self.root, self.m = Path(root), m
        self._zarr: dict[str, zarr.Array] = {}
        self.reads = 0  # chunk reads so far (tests check that skipped windows are not read)

    def read(self, array: str, k: int, out: np.ndarray) -> None:
        """Fill `out` (rows_per_chunk rows of the array's on-disk dtype) with chunk k."""
        self.reads += 1
        compressed = self.m.codec != "none" and array != TOKENS
        if compressed:
            if array not in self._zarr:
                self._zarr[array] = zarr.open_array(str(self.root / array), mode="r")
            lo = k * self.m.rows_per_chunk
            data = self._zarr[array][lo:lo + self.m.rows_per_chunk]
            out[...] = data.view(out.dtype)  # bfloat16: uint16 on disk, int16 in our buffers
            return
        path = chunk_file(self.root, array, out.ndim, k)
        view = memoryview(out.reshape(-1).view(np.uint8))
        try:
            with open(path, "rb", buffering=0) as f:
                n = f.readinto(view)
                extra = f.read(1)
        except FileNotFoundError:
            raise PipelineError(f"chunk {k} of {array} is missing ({path}); run `pipeline verify`"
                                ) from None
        if n != out.nbytes or extra:
            raise PipelineError(f"chunk {k} of {array} ({path}) has the wrong size (expected "
                                f"{out.nbytes} bytes): truncated or corrupt; run `pipeline verify`")

    def tokens(self, k: int) -> np.ndarray:
        out = np.empty(self.m.rows_per_chunk, dtype="<i4")
        self.read(TOKENS, k, out)
        return out
