"""Read one whole chunk of one cache array into a caller's buffer: straight from the chunk file
when uncompressed (one readinto, no decode), through zarr otherwise."""

from __future__ import annotations

import mmap
import os
import warnings
from pathlib import Path

import numpy as np
import torch
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

    def map(self, array: str, k: int, dtype: torch.dtype) -> torch.Tensor:
        """Chunk k of an uncompressed activation array as a [rows, d_model] tensor over a
        memory map of its file (read-ahead requested at once), so gathering batches from it is
        the only copy. (MAP_POPULATE measured slower here: page-table setup up front.)"""
        self.reads += 1
        path = chunk_file(self.root, array, 2, k)
        shape = (self.m.rows_per_chunk, self.m.d_model)
        expected = shape[0] * shape[1] * dtype.itemsize
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise PipelineError(f"chunk {k} of {array} is missing ({path}); run `pipeline verify`"
                                ) from None
        try:
            if os.fstat(fd).st_size != expected:
                raise PipelineError(f"chunk {k} of {array} ({path}) has the wrong size (expected "
                                    f"{expected} bytes): truncated or corrupt; run "
                                    "`pipeline verify`")
            mm = mmap.mmap(fd, expected, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            if hasattr(mm, "madvise"):  # start reading a cold file now, in the background
                mm.madvise(mmap.MADV_WILLNEED)
        finally:
            os.close(fd)
        with warnings.catch_warnings():  # read-only buffer: we only ever read from it
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(mm, dtype=dtype).view(shape)

    def tokens(self, k: int) -> np.ndarray:
        out = np.empty(self.m.rows_per_chunk, dtype="<i4")
        self.read(TOKENS, k, out)
        return out
