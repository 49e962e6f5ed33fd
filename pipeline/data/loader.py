"""ActivationLoader: fixed-shape, shuffled training batches of one layer and stream of a cache.

Three small pieces: chunk reads into a ring of reused host window buffers (a thread pool; the
next window is read while the current one is served), the shuffle (pure functions in
shuffle.py), and batch assembly into a ring of reused staging buffers (a background thread), then
a device copy on a side CUDA stream. Host buffers are pinned when the batches go to a GPU.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cache_schema import Manifest, activation_array, hook_name, open_cache, read_chunk_record
from pipeline.data.reader import ChunkReader
from pipeline.data.shuffle import RowPlan, chunk_is_masked, window_permutation
from pipeline.errors import PipelineError

_TORCH_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.int16}
STAGING_SLOTS = 4


class ActivationLoader:
    """Infinite iterator of float32 [batch_size, d_model] batches on `device` (raw activations,
    not scaled by norm_scale). Batch i is a pure function of (cache, seed, i): `start_step` skips
    to batch i reading only the windows it needs. A yielded tensor stays valid until the next
    call to `next()`; copy it (the trainer copies it into its static input at once).

    Uncompressed caches are memory-mapped chunk by chunk (two windows mapped at a time, in the
    page cache); batches are gathered from the maps, rows grouped by chunk within a batch.
    Host memory: 4 staging batches of batch_size x d_model x itemsize bytes, plus for compressed
    caches 2 window buffers of window_chunks x rows_per_chunk x d_model x itemsize.
    """

    def __init__(self, cache: str | Path, layer: int, stream: str = "clean",
                 batch_size: int = 4096, seed: int = 0, start_step: int = 0,
                 window_chunks: int = 4, device: str | torch.device = "cpu",
                 keep_special: bool = False, holdout_chunks: int = 0,
                 mix_fraction: float = 0.5, n_threads: int = 2, pin: bool | None = None):
        self.root = Path(cache)
        self.manifest: Manifest = open_cache(self.root)
        m = self.manifest
        if layer not in m.layers:
            raise PipelineError(f"layer {layer} is not in the cache {cache}, which holds layers "
                                f"{m.layers}")
        if stream not in ("clean", "masked", "mix"):
            raise PipelineError(f"unknown stream {stream!r}: expected clean, masked or mix")
        if not 0.0 <= mix_fraction <= 1.0:
            raise PipelineError(f"mix fraction must be in [0, 1], got {mix_fraction}")
        if batch_size < 1 or window_chunks < 1:
            raise PipelineError("batch size and window chunks must be at least 1")
        if not 0 <= holdout_chunks < m.n_chunks:
            raise PipelineError(f"holdout of {holdout_chunks} chunks leaves nothing to train on: "
                                f"the cache has {m.n_chunks} chunks")
        self.hook, self.d_model, self.stream = hook_name(layer), m.d_model, stream
        self.batch_size, self.seed, self.keep_special = batch_size, seed, keep_special
        self.mix_fraction, self.window_chunks = mix_fraction, window_chunks
        self.device = torch.device(device)
        self.train_chunks = list(range(m.n_chunks - holdout_chunks))
        self.holdout_chunk_ids = list(range(m.n_chunks - holdout_chunks, m.n_chunks))
        self.norm_scale = self._norm_scale()
        self.reader = ChunkReader(self.root, m)
        self.special = np.asarray(m.special_token_ids, dtype=np.int64)
        self.plan = RowPlan(self.train_chunks, self._valid_counts(), seed, window_chunks)
        self.rows_per_epoch = self.plan.rows_per_epoch
        if self.rows_per_epoch == 0:
            raise PipelineError(f"the training chunks of {cache} hold no non-special rows")
        self.step = start_step
        self.pin = (self.device.type == "cuda" and torch.cuda.is_available()) if pin is None \
            else pin
        dtype = self._dtype = _TORCH_STORAGE[m.storage_dtype]
        self._mapped = m.codec == "none"
        rows = window_chunks * m.rows_per_chunk
        self._windows = [] if self._mapped else [self._empty((rows, m.d_model), dtype)
                                                 for _ in range(2)]
        self._staging = [self._empty((batch_size, m.d_model), dtype) for _ in range(STAGING_SLOTS)]
        self._free: queue.Queue = queue.Queue()
        for i in range(STAGING_SLOTS):
            self._free.put(i)
        self._ready: queue.Queue = queue.Queue()
        self._held: int | None = None
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max(n_threads, 1), thread_name_prefix="chunk-read")
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="window-prefetch")
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            self._side = torch.cuda.Stream(self.device)
            self._dev = [torch.empty((batch_size, m.d_model), dtype=dtype, device=self.device)
                         for _ in range(3)]
            self._dev_free: list[torch.cuda.Event | None] = [None] * 3
            self._dev_i = 0
            self._pending: list[tuple[int, torch.cuda.Event]] = []
        self._thread = threading.Thread(target=self._assemble, name="batch-assembly", daemon=True)

    # -- setup ----------------------------------------------------------------------------------
    def _empty(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def _norm_scale(self) -> float:
        stats = self.manifest.norm_stats.get(self.hook, {})
        means = {s: stats.get(s, {}).get("mean_norm") for s in ("clean", "masked")}
        p = {"clean": 0.0, "masked": 1.0, "mix": self.mix_fraction}[self.stream]
        needed = [s for s, w in (("clean", 1 - p), ("masked", p)) if w > 0]
        if any(not means[s] for s in needed):
            raise PipelineError(f"the cache manifest has no norm statistics for {self.hook} "
                                f"({', '.join(needed)}): re-extract the cache")
        mean = sum(w * means[s] for s, w in (("clean", 1 - p), ("masked", p)) if w > 0)
        return math.sqrt(self.d_model) / mean

    def _valid_counts(self) -> dict[int, int]:
        if self.keep_special:
            return dict.fromkeys(self.train_chunks, self.manifest.rows_per_chunk)
        return {k: int(read_chunk_record(self.root, k)["stats"][self.hook]["clean"]["count"])
                for k in self.train_chunks}

    # -- background: windows and batches --------------------------------------------------------
    def _stream_of(self, epoch: int, k: int) -> str:
        if self.stream != "mix":
            return self.stream
        return "masked" if chunk_is_masked(self.seed, epoch, k, self.mix_fraction) else "clean"

    def _valid_rows(self, k: int) -> np.ndarray:
        rows = self.manifest.rows_per_chunk
        if self.keep_special:
            return np.arange(rows)
        valid = np.flatnonzero(~np.isin(self.reader.tokens(k), self.special))
        if valid.size != self.plan.counts[k]:
            raise PipelineError(f"chunk {k}: its tokens give {valid.size} non-special rows but "
                                f"its record says {self.plan.counts[k]}; run `pipeline verify`")
        return valid

    def _read_window(self, slot: int, epoch: int, w: int, chunks: list[int]):
        """Map (uncompressed) or read (compressed, into window buffer `slot`) a window's chunks
        in parallel; returns the chunk tensors and the window's shuffled row index."""
        R = self.manifest.rows_per_chunk

        def one(i: int, k: int) -> tuple[torch.Tensor, np.ndarray]:
            name = activation_array(self._stream_of(epoch, k), self.hook)
            if self._mapped:
                t = self.reader.map(name, k, self._dtype)
            else:
                t = self._windows[slot][i * R:(i + 1) * R]
                self.reader.read(name, k, t.numpy())
            return t, self._valid_rows(k) + i * R

        parts = list(self._pool.map(one, range(len(chunks)), chunks))
        rows = np.concatenate([p[1] for p in parts])
        perm = window_permutation(self.seed, epoch, w, rows.size)
        return [p[0] for p in parts], torch.from_numpy(rows[perm])

    def _windows_from(self, row: int):
        """(chunk tensors, shuffled row index, first offset) of each window from global `row`
        on, reading the next window while the caller serves the current one."""
        pos = self.plan.locate(row)
        epoch, w, offset = pos.epoch, pos.window, pos.offset
        slot = 0
        windows = self.plan.windows(epoch)
        future = self._prefetch.submit(self._read_window, slot, epoch, w, windows[w])
        while not self._stop.is_set():
            chunks, idx = future.result()
            w += 1
            if w == len(windows):
                epoch, w, windows = epoch + 1, 0, self.plan.windows(epoch + 1)
            slot = 1 - slot
            future = self._prefetch.submit(self._read_window, slot, epoch, w, windows[w])
            yield chunks, idx, offset
            offset = 0

    def _gather(self, chunks: list[torch.Tensor], idx: torch.Tensor, out: torch.Tensor) -> None:
        """out = the window rows idx in ascending order (one index_select per chunk; each row
        is copied once, straight from the page cache when mapped, in address order)."""
        R = self.manifest.rows_per_chunk
        idx = torch.sort(idx).values  # ascending addresses: the batch is a set, order is free
        which = torch.div(idx, R, rounding_mode="floor")
        pos = 0
        for i, n in enumerate(torch.bincount(which, minlength=len(chunks)).tolist()):
            if n:
                torch.index_select(chunks[i], 0, idx[pos:pos + n] - i * R, out=out[pos:pos + n])
                pos += n

    def _take_slot(self) -> int | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _assemble(self) -> None:
        try:
            B = self.batch_size
            slot, filled = self._take_slot(), 0
            for chunks, idx, offset in self._windows_from(self.step * B):
                while offset < idx.numel() and slot is not None:
                    n = min(B - filled, idx.numel() - offset)
                    self._gather(chunks, idx[offset:offset + n],
                                 self._staging[slot][filled:filled + n])
                    filled, offset = filled + n, offset + n
                    if filled == B:
                        self._ready.put(slot)
                        slot, filled = self._take_slot(), 0
                if slot is None:
                    return
        except BaseException as e:  # surfaced in __next__
            self._ready.put(e)

    # -- the iterator ---------------------------------------------------------------------------
    def __iter__(self) -> ActivationLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self._thread.ident is None:  # started on first use: holdout-only users read nothing
            self._thread.start()
        if self._held is not None:
            self._release(self._held)
            self._held = None
        while True:
            try:
                item = self._ready.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise PipelineError("the loader's background thread stopped") from None
        if isinstance(item, BaseException):
            self.close()
            if isinstance(item, PipelineError):
                raise item
            raise PipelineError(f"reading the cache failed: {item}") from item
        self.step += 1
        return self._deliver(item)

    def _release(self, slot: int) -> None:
        if self._cuda:
            self._pending.append((slot, self._last_copy))
            dev = (self._dev_i - 1) % 3
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._dev_free[dev] = ev
            for s, done in self._pending[:-1]:
                done.synchronize()
                self._free.put(s)
            self._pending = self._pending[-1:]
            return
        self._free.put(slot)

    def _deliver(self, slot: int) -> torch.Tensor:
        host = self._staging[slot]
        if not self._cuda:
            self._held = slot
            return _to_float(host)
        i = self._dev_i % 3
        self._dev_i += 1
        with torch.cuda.stream(self._side):
            if self._dev_free[i] is not None:
                self._side.wait_event(self._dev_free[i])
            self._dev[i].copy_(host, non_blocking=True)
            self._last_copy = torch.cuda.Event()
            self._last_copy.record(self._side)
        torch.cuda.current_stream(self.device).wait_event(self._last_copy)
        self._held = slot
        return _to_float(self._dev[i])

    def holdout(self, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        """The held-out chunks in order (clean stream for mix), special rows left out unless
        keep_special; the last batch may be shorter."""
        stream = "clean" if self.stream == "mix" else self.stream
        name = activation_array(stream, self.hook)
        R, B = self.manifest.rows_per_chunk, batch_size or self.batch_size
        dtype = _TORCH_STORAGE[self.manifest.storage_dtype]
        buf = torch.empty((R, self.d_model), dtype=dtype)
        rows = []
        for k in self.holdout_chunk_ids:
            self.reader.read(name, k, buf.numpy())
            valid = np.arange(R) if self.keep_special else np.flatnonzero(
                ~np.isin(self.reader.tokens(k), self.special))
            rows.append(_to_float(buf[torch.from_numpy(valid)]))
        if rows:
            data = torch.cat(rows)
            for i in range(0, data.shape[0], B):
                yield data[i:i + B].to(self.device)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._prefetch.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ActivationLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()


def _to_float(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.int16:  # bfloat16 bit patterns
        return t.view(torch.bfloat16).float()
    return t if t.dtype == torch.float32 else t.float()
