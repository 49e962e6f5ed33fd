"""Background chunk writer: Zarr array writes, checksums and chunk records off the compute thread."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np

from cache_schema import Manifest
from cache_schema.write import open_arrays, write_chunk
from pipeline.errors import PipelineError

_FLOAT16_MAX = 65504.0


def check_finite(m: Manifest, k: int, row0: int, hook: str, stream: str, norms: np.ndarray,
                 stored: np.ndarray) -> None:
    """Refuse a batch with a non-finite row before its chunk is written. A row's norm is
    non-finite iff one of its entries is (or the norm overflows); float16 storage overflows to
    inf only on entries above 65504, which forces the norm above that, so the full scan of the
    stored values runs only then."""
    bad = ~np.isfinite(norms)
    if m.storage_dtype == "float16" and not bad.any() and norms.max(initial=0.0) > _FLOAT16_MAX:
        bad = ~np.isfinite(stored.astype(np.float32)).all(axis=1)
    if not bad.any():
        return
    first = row0 + int(np.flatnonzero(bad)[0])
    raise PipelineError(
        f"chunk {k}: {int(bad.sum())} row(s) of the {stream} stream of {hook} hold non-finite "
        f"activations (NaN or inf in {m.compute_dtype}, stored as {m.storage_dtype}), the first at "
        f"row {first} of the chunk (global row {k * m.rows_per_chunk + first}); expected finite "
        "values. Try --compute-dtype float32 (and --dtype float32 if float16 storage overflows), "
        f"or check the model's weights. Chunk {k} was not written; the chunks before it are "
        "kept and a re-run resumes there.")


class ChunkWriter:
    """Writes submitted chunks in a background thread; at most `depth` chunks wait in memory.

    A chunk's record (checksums + stats) is written only after all its array files, so a crash
    at any point leaves either a finished chunk or one that a resume rewrites.
    """

    def __init__(self, root: str | Path, m: Manifest, depth: int = 2, on_chunk=None):
        self.root, self.m = Path(root), m
        self.on_chunk = on_chunk  # on_chunk(k): in the writer thread, once chunk k is complete
        self.arrays = open_arrays(root, m)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="chunk-writer", daemon=True)
        self.thread.start()

    def submit(self, k: int, data: dict[str, np.ndarray], stats: dict) -> None:
        self._raise()
        self.queue.put((k, data, stats))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the chunk writer failed: {self.error}") from self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain so that submit() never blocks forever
            try:
                k, data, stats = item
                write_chunk(self.root, self.m, self.arrays, k, data, stats)
                if self.on_chunk is not None:
                    self.on_chunk(k)
            except BaseException as e:  # surfaced on the next submit/close
                self.error = e
