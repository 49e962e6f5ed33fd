"""Read one whole chunk of one cache array: into a caller's buffer straight from the chunk file
when uncompressed (readinto, no decode, the GIL released), decompressed otherwise; or
map it into a WindowMap slot (uncompressed only).

Every chunk file is checked against its chunk record (size, and its XXH3-64, or SHA-256 in
caches that record only that, hashed while the bytes are read, in the calling read thread) the
first time this reader reads it, before its rows can reach a batch (cache_schema/integrity.py;
SPEC.md §8)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from cache_schema import TOKENS, CacheError, Manifest, array_specs, chunk_file, read_chunk_record
from cache_schema.files import HASHES
from cache_schema.integrity import (
    ChunkMismatch,
    checksum_mismatch,
    decompress,
    expected_file_bytes,
    read_chunk_file,
    recorded_digests,
)
from pipeline.data.mapping import WindowMap
from pipeline.errors import PipelineError
from pipeline.remote import fetcher


class ChunkReader:
    """Chunk reads of one cache. `reads` counts them (tests check what a resume skips). With
    verify (the default) each chunk file is checked against its record on its first read; off
    only for benchmarks: corrupt bytes would then be trained on."""

    def __init__(self, root: str | Path, m: Manifest, verify: bool = True):
        self.root, self.m, self.verify = Path(root), m, verify
        self._fetch = fetcher(self.root)  # remote caches: download a chunk file on first read
        self._specs = array_specs(m)
        self._lock = threading.Lock()
        self._records: dict[int, dict] = {}
        self._checked: set[tuple[str, int]] = set()
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

    def _expected(self, array: str, k: int) -> dict[str, str] | None:
        """The recorded digest ({algorithm: hex}) this chunk file must match if it still has to
        be checked, else None: XXH3-64 where the record has it, SHA-256 otherwise."""
        if not self.verify or (array, k) in self._checked:
            return None
        with self._lock:
            record = self._records.get(k)
        if record is None:
            try:
                record = read_chunk_record(self.root, k)
            except CacheError as e:
                raise PipelineError(f"{e}; run `pipeline verify`") from e
            with self._lock:
                self._records[k] = record
        for algorithm in ("xxh3", "sha256"):
            found = recorded_digests(record, array, (algorithm,))
            if found:
                return found
        raise PipelineError(f"the record of chunk {k} has no checksum for {array}: the "
                            "cache is corrupt; run `pipeline verify`")

    def _checked_ok(self, array: str, k: int, digests: dict[str, str] | None) -> None:
        if digests is not None:
            with self._lock:
                self._checked.add((array, k))

    def read(self, array: str, k: int, out: np.ndarray) -> None:
        """Fill `out` (the chunk's rows, C-contiguous, of the array's on-disk itemsize) with
        chunk k of `array`. bfloat16 arrays (uint16 on disk) may be read into any 2-byte dtype."""
        self._count(array, k)
        path = self._path(array, out.ndim, k)
        shape, dtype = self._specs[array]
        size = expected_file_bytes(self.m, shape, dtype)
        digests = self._expected(array, k)
        view = memoryview(out.reshape(-1).view(np.uint8))
        try:
            if size is not None:  # uncompressed: straight into out
                if size != out.nbytes:
                    raise ValueError(f"a buffer of {out.nbytes} bytes for {size}-byte chunks")
                read_chunk_file(path, k, array, size=size, digests=digests, out=view)
            else:
                frame = read_chunk_file(path, k, array, digests=digests)
                view[:] = decompress(self.m.codec, frame, k, array, path, len(view))
        except ChunkMismatch as e:
            raise PipelineError(str(e)) from e
        self._checked_ok(array, k, digests)

    def map_into(self, window: WindowMap, slot: int, array: str, k: int) -> None:
        """Map chunk k of an uncompressed activation array into a slot of `window` (checked
        against its record on the first read, from the mapped pages)."""
        self._count(array, k)
        path = self._path(array, 2, k)
        digests = self._expected(array, k)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise PipelineError(str(ChunkMismatch(k, array, path, "is missing"))) from None
        if size != window.chunk_bytes:  # reading a mapping past the end of a file would crash
            raise PipelineError(str(ChunkMismatch(
                k, array, path, f"has {size} bytes where {window.chunk_bytes} were expected")))
        window.place(slot, path)
        for algorithm, recorded in (digests or {}).items():
            found = HASHES[algorithm](window.slot_view(slot)).hexdigest()
            if found != recorded:
                raise PipelineError(str(ChunkMismatch(
                    k, array, path, checksum_mismatch(algorithm, found, recorded))))
        self._checked_ok(array, k, digests)

    def tokens(self, k: int) -> np.ndarray:
        """Clean token ids of chunk k."""
        out = np.empty(self.m.rows_per_chunk, dtype=self._specs[TOKENS][1])
        self.read(TOKENS, k, out)
        return out
