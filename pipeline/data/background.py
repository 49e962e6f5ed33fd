"""The loader's background half: window reads into a ring of window buffers, and batch assembly
into a ring of staging buffers. Two daemon threads joined by queues of buffer slots. It holds no
reference to the ActivationLoader, so an unclosed loader is still garbage collected (its
finalizer then stops these threads).

A window buffer is an ordinary host buffer the chunks are read (or decoded) into: a chunk file
truncated or rewritten while training runs then gives a clear error at its next read, and the
bytes already read stay valid. Memory-mapped windows (WindowMap: batches gathered straight from
the page cache) are kept only as an opt-in for comparison: a file truncated under a mapping kills
the process with SIGBUS, which no Python code can turn into an error.
"""

from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cache_schema import activation_array
from pipeline.data.mapping import WindowMap, mapping_supported
from pipeline.data.reader import ChunkReader
from pipeline.data.shuffle import Position, RowPlan, chunk_is_masked, valid_rows, window_order
from pipeline.errors import PipelineError

WINDOW_SLOTS = 2
"""Window buffers: one served, one being read."""
STAGING_SLOTS = 4
"""Host batch buffers: one (or two, on CUDA) with the consumer, the rest prepared ahead."""
_POLL_S = 0.05


class Stopped(Exception):
    """The pipeline was closed while a thread waited."""


class BatchPipeline:
    """Puts the staging-slot index of each finished batch, in order from `start`, on `ready`
    (or the exception that stopped it). The consumer reads `staging[slot]` and gives the slot
    back with `release(slot)`."""

    def __init__(self, reader: ChunkReader, plan: RowPlan, start: Position, hook: str,
                 stream: str, mix_fraction: float, special: np.ndarray | None,
                 batch_size: int, dtype: torch.dtype, pin: bool, n_threads: int,
                 mapped: bool = False):
        m = reader.m
        self.reader, self.plan, self.start, self.hook = reader, plan, start, hook
        self.stream, self.mix_fraction, self.special = stream, mix_fraction, special
        self.batch_size, self.n_threads = batch_size, n_threads
        R, D = m.rows_per_chunk, m.d_model
        chunk_bytes = R * D * dtype.itemsize
        self.mapped = mapped and m.codec == "none" and mapping_supported(chunk_bytes)
        if self.mapped:
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            self.maps = [WindowMap(plan.window_chunks, R, (D,), np_dtype)
                         for _ in range(WINDOW_SLOTS)]
            self.windows = [wm.array for wm in self.maps]
            self.host_bytes = 0
        else:
            self.maps = []
            self.windows = [torch.empty((plan.window_chunks * R, D), dtype=dtype).numpy()
                            for _ in range(WINDOW_SLOTS)]
            self.host_bytes = sum(w.nbytes for w in self.windows)
        self.staging = [torch.empty((batch_size, D), dtype=dtype, pin_memory=pin)
                        for _ in range(STAGING_SLOTS)]
        self.host_bytes += sum(s.nbytes for s in self.staging)
        self.free_windows: queue.Queue = queue.Queue()
        self.full_windows: queue.Queue = queue.Queue()
        self.free_staging: queue.Queue = queue.Queue()
        self.ready: queue.Queue = queue.Queue()
        for i in range(WINDOW_SLOTS):
            self.free_windows.put(i)
        for i in range(STAGING_SLOTS):
            self.free_staging.put(i)
        self.stopping = threading.Event()
        self.pool: ThreadPoolExecutor | None = None
        self.gather_pool: ThreadPoolExecutor | None = None
        self.threads = [threading.Thread(target=self._read_windows, name="loader-windows",
                                         daemon=True),
                        threading.Thread(target=self._assemble, name="loader-batches",
                                         daemon=True)]

    def start_threads(self) -> None:
        if self.n_threads > 1:
            self.pool = ThreadPoolExecutor(self.n_threads, thread_name_prefix="loader-read")
            self.gather_pool = ThreadPoolExecutor(self.n_threads - 1,
                                                  thread_name_prefix="loader-gather")
        for t in self.threads:
            t.start()

    @property
    def started(self) -> bool:
        return self.threads[0].ident is not None

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def release(self, slot: int) -> None:
        self.free_staging.put(slot)

    def close(self) -> None:
        """Stop both threads and the read pool, then unmap; idempotent, safe in a finalizer."""
        self.stopping.set()
        for t in self.threads:
            if t.ident is not None and t is not threading.current_thread():
                t.join(timeout=10)
        for pool in (self.pool, self.gather_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if not self.alive():  # never unmap under a thread still gathering (it would crash)
            for wm in self.maps:
                wm.close()

    # -- threads --------------------------------------------------------------------------------
    def _get(self, q: queue.Queue):
        while not self.stopping.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        raise Stopped

    def _read_windows(self) -> None:
        """Fill free window buffers with the next windows, in order."""
        try:
            offset = self.start.offset
            for epoch, w, chunks in self.plan.windows_from(self.start):
                slot = self._get(self.free_windows)
                order = self._fill(slot, epoch, w, chunks)
                self.full_windows.put((slot, order, offset))
                offset = 0
        except Stopped:
            return
        except BaseException as e:  # handed on after the batches already prepared, in order
            self.full_windows.put(e)

    def _fill(self, slot: int, epoch: int, w: int, chunks: list[int]) -> np.ndarray:
        """Read or map a window's chunks into window `slot` (n_threads at a time); returns
        the window's shuffled row order."""
        R = self.reader.m.rows_per_chunk

        def one(i: int, k: int) -> np.ndarray:
            if self.stopping.is_set():
                raise Stopped
            masked = self.stream == "masked" or (
                self.stream == "mix" and chunk_is_masked(self.plan.seed, epoch, k,
                                                         self.mix_fraction))
            name = activation_array("masked" if masked else "clean", self.hook)
            if self.mapped:
                self.reader.map_into(self.maps[slot], i, name, k)
            else:
                self.reader.read(name, k, self.windows[slot][i * R:(i + 1) * R])
            if self.special is None:
                return np.arange(R, dtype=np.int64)
            rows = valid_rows(self.reader.tokens(k), self.special)
            if rows.size != self.plan.counts[k]:
                raise PipelineError(
                    f"chunk {k}: its tokens give {rows.size} non-special rows but its record "
                    f"says {self.plan.counts[k]}: the cache is corrupt; run `pipeline verify`")
            return rows

        if self.pool is None or len(chunks) == 1:
            valid = [one(i, k) for i, k in enumerate(chunks)]
        else:
            valid = list(self.pool.map(one, range(len(chunks)), chunks))
        return window_order(valid, R, self.plan.seed, epoch, w)

    def _assemble(self) -> None:
        """Gather batches from the filled windows, in stream order, into staging buffers."""
        try:
            B = self.batch_size
            slot, filled = self._get(self.free_staging), 0
            while True:
                item = self._get(self.full_windows)
                if isinstance(item, BaseException):
                    self.ready.put(item)
                    return
                wslot, order, offset = item
                while offset < order.size:
                    n = min(B - filled, order.size - offset)
                    gather(self.windows[wslot], order[offset:offset + n],
                           self.staging[slot][filled:filled + n], self.gather_pool,
                           self.n_threads)
                    filled, offset = filled + n, offset + n
                    if filled == B:
                        self.ready.put(slot)
                        slot, filled = self._get(self.free_staging), 0
                self.free_windows.put(wslot)
        except Stopped:
            return
        except BaseException as e:
            self.ready.put(e)


def gather(src: np.ndarray, rows: np.ndarray, out: torch.Tensor,
           pool: ThreadPoolExecutor | None = None, parts: int = 1) -> None:
    """out[:] = src[rows], in that order. np.take with mode="clip" (rows are always in range)
    writes straight into out and releases the GIL; torch's index_select would start an OpenMP
    team per calling thread, which stalls when the cores are busy reading. With a pool, the
    rows are split into `parts` slices copied at once (this thread takes the last): a random
    row gather from the page cache runs at ~6 GB/s on one core of these machines and ~14 GB/s
    on two, faster than one sequential read (bench_loader.py)."""
    dst = out.numpy()
    if pool is None or parts < 2 or len(rows) < 2 * parts:
        np.take(src, rows, axis=0, out=dst, mode="clip")
        return
    bounds = np.linspace(0, len(rows), parts + 1).astype(int)
    jobs = [pool.submit(np.take, src, rows[lo:hi], 0, dst[lo:hi], "clip")
            for lo, hi in itertools.pairwise(bounds[:-1])]
    np.take(src, rows[bounds[-2]:], axis=0, out=dst[bounds[-2]:], mode="clip")
    for job in jobs:
        job.result()
