"""ActivationLoader: fixed-shape, shuffled training batches of one layer and stream of a cache.

Three small pieces: chunk reads (reader.py), the order of rows (pure functions, shuffle.py), and
the background threads that read windows and assemble batches (background.py); this module
adds the device copy and the public API.
"""

from __future__ import annotations

import math
import os
import queue
import weakref
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cache_schema import STREAMS as CACHE_STREAMS
from cache_schema import Manifest, activation_array, hook_name, open_cache, read_chunk_record
from cache_schema.dtypes import read_dtype
from pipeline.data.background import STAGING_SLOTS, BatchPipeline, gather
from pipeline.data.reader import ChunkReader
from pipeline.data.shuffle import RowPlan, valid_rows
from pipeline.errors import PipelineError
from pipeline.remote import local_cache

# what the loader serves: one of the cache's streams, or both mixed
STREAMS = (*CACHE_STREAMS, "mix")
DEVICE_SLOTS = 3


def default_read_threads() -> int:
    """Read threads when none are asked for: one per core up to 4. They also hash each chunk on
    its first read, which bounds a first epoch's throughput on few cores."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


def should_pin(device: torch.device, pin: bool | None) -> bool:
    """Pin host staging buffers only for copies to a usable GPU (pinning fails without CUDA)."""
    if pin is not None:
        return pin
    return device.type == "cuda" and torch.cuda.is_available()


class ActivationLoader:
    """Infinite iterator of float32 [batch_size, d_model] batches of `hook`'s activations on
    `device`: raw values, not scaled by `norm_scale`. Batch i is rows [i*B, (i+1)*B) of the
    seeded global row stream (shuffle.py), so it depends only on (cache, arguments, i), and
    `start_step` skips to batch i reading only the windows from there on.

    A yielded tensor is valid until the next call to next(): copy it (the trainer copies it into
    its static input at once). On CUDA the copy runs on a side stream, ordered before the
    consumer's current stream; the device slot is reused only once that stream has passed the
    point where next() was called again.

    Arguments beyond the obvious: `window_chunks` chunks are shuffled together (more: better
    mixing, more memory); `keep_special` keeps BOS/EOS/... rows (left out by default: their
    norms are outliers); the last `holdout_chunks` chunks are never trained on (`holdout()`);
    `mix_fraction` is the share of chunks read from the masked stream with stream "mix";
    `n_threads` chunks of a window are read at once (default: one per core, up to 4); `pin`
    forces pinned staging on or off
    (default: pinned iff device is CUDA and CUDA is available); `verify=False` skips the check of
    each chunk file against its record (benchmarks only: corrupt bytes would be trained on);
    `mapped=True` memory-maps uncompressed chunk files instead of reading them (benchmarks and
    tests only: a file truncated under a mapping kills the process with SIGBUS).

    Host memory (`host_bytes`): 4 staging batches of batch_size x d_model x itemsize (pinned when
    the batches go to a GPU), plus 2 window buffers of window_chunks x rows_per_chunk x d_model
    x itemsize that chunks are read into (none with mapped=True: mapped windows live in the page
    cache). On CUDA, also 3 device batches of the storage dtype.
    """

    def __init__(self, cache: str | Path, layer: int, stream: str = "clean",
                 batch_size: int = 4096, seed: int = 0, start_step: int = 0,
                 window_chunks: int = 4, device: str | torch.device = "cpu",
                 keep_special: bool = False, holdout_chunks: int = 0,
                 mix_fraction: float = 0.5, n_threads: int | None = None, pin: bool | None = None,
                 verify: bool = True, mapped: bool = False):
        self.root = local_cache(cache)  # a remote cache reads through a local mirror
        n_threads = default_read_threads() if n_threads is None else n_threads
        self.manifest: Manifest = open_cache(self.root)
        m = self.manifest
        _check_args(m, cache, layer, stream, batch_size, start_step, window_chunks,
                    holdout_chunks, mix_fraction, n_threads)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise PipelineError(f"device {device} was asked for but CUDA is not available "
                                "here: use device cpu")
        self.hook, self.d_model, self.stream = hook_name(layer), m.d_model, stream
        self.batch_size, self.seed, self.keep_special = batch_size, seed, keep_special
        self.mix_fraction, self.window_chunks = mix_fraction, window_chunks
        self.train_chunks = list(range(m.n_chunks - holdout_chunks))
        self.holdout_chunk_ids = list(range(m.n_chunks - holdout_chunks, m.n_chunks))
        self.norm_scale = self._norm_scale()
        self.reader = ChunkReader(self.root, m, verify)
        self._special = None if keep_special else np.asarray(m.special_token_ids, np.int64)
        self.plan = RowPlan(self.train_chunks, self._valid_counts(), seed, window_chunks)
        self.rows_per_epoch = self.plan.rows_per_epoch
        if self.rows_per_epoch == 0:
            raise PipelineError(f"the training chunks of {cache} hold no non-special rows: "
                                "use keep_special or fewer holdout chunks")
        self.step = start_step
        self.pin = should_pin(self.device, pin)
        self._dtype = getattr(torch, read_dtype(m.storage_dtype))
        self._pipe = BatchPipeline(self.reader, self.plan, self.plan.locate(start_step * batch_size),
                                   self.hook, stream, mix_fraction, self._special, batch_size,
                                   self._dtype, self.pin, n_threads, mapped)
        self._finalizer = weakref.finalize(self, self._pipe.close)
        self._held: int | None = None
        self._error: PipelineError | None = None
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            self._side = torch.cuda.Stream(self.device)
            self._dev = [torch.empty((batch_size, m.d_model), dtype=self._dtype, device=self.device)
                         for _ in range(DEVICE_SLOTS)]
            self._dev_free: list[torch.cuda.Event | None] = [None] * DEVICE_SLOTS
            self._dev_next = 0
            self._copies: deque = deque()  # (staging slot, copy-done event), oldest first

    @property
    def host_bytes(self) -> int:
        """Bytes of host buffers this loader holds (window ring + staging ring)."""
        return self._pipe.host_bytes

    # -- setup ----------------------------------------------------------------------------------
    def _norm_scale(self) -> float:
        stats = self.manifest.norm_stats.get(self.hook, {})
        p = {"clean": 0.0, "masked": 1.0, "mix": self.mix_fraction}[self.stream]
        weights = [(s, w) for s, w in (("clean", 1 - p), ("masked", p)) if w > 0]
        means = {s: stats.get(s, {}).get("mean_norm") for s, _ in weights}
        if not all(means.values()):
            raise PipelineError(f"the cache manifest has no norm statistics for {self.hook} "
                                f"({', '.join(means)}): re-extract the cache")
        return math.sqrt(self.d_model) / sum(w * means[s] for s, w in weights)

    def _valid_counts(self) -> dict[int, int]:
        if self.keep_special:
            return dict.fromkeys(self.train_chunks, self.manifest.rows_per_chunk)
        stream = "clean" if self.stream == "mix" else self.stream  # same rows in both streams
        return {k: int(read_chunk_record(self.root, k)["stats"][self.hook][stream]["count"])
                for k in self.train_chunks}

    # -- the iterator ---------------------------------------------------------------------------
    def __iter__(self) -> ActivationLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self._error is not None:
            raise self._error
        if not self._finalizer.alive:
            raise PipelineError("this loader was closed (its threads have stopped): create a "
                                "new ActivationLoader to read more batches")
        if not self._pipe.started:  # started on first use: holdout-only users read nothing
            self._pipe.start_threads()
        self._release()
        item = self._wait_ready()
        if isinstance(item, BaseException):
            self.close()
            if isinstance(item, PipelineError):
                self._error = item
                raise item
            self._error = PipelineError(f"reading the cache {self.root} failed: "
                                        f"{type(item).__name__}: {item}")
            raise self._error from item
        self.step += 1
        return self._deliver_cuda(item) if self._cuda else self._deliver_cpu(item)

    def _wait_ready(self):
        while True:
            try:
                return self._pipe.ready.get(timeout=1.0)
            except queue.Empty:
                if self._cuda:
                    self._drain_copies(all_of_them=True)
                if not self._pipe.alive() and self._pipe.ready.empty():
                    self._error = PipelineError("the loader's background threads have stopped "
                                                "(closed?): create a new loader")
                    raise self._error from None

    def _deliver_cpu(self, slot: int) -> torch.Tensor:
        host = self._pipe.staging[slot]
        if host.dtype == torch.float32:
            self._held = slot  # handed out as is: given back at the next call
            return host
        out = _to_float(host)
        self._pipe.release(slot)
        return out

    def _deliver_cuda(self, slot: int) -> torch.Tensor:
        i = self._dev_next
        self._dev_next = (i + 1) % DEVICE_SLOTS
        with torch.cuda.stream(self._side):
            if self._dev_free[i] is not None:  # the consumer is done with this slot's last batch
                self._side.wait_event(self._dev_free[i])
            self._dev[i].copy_(self._pipe.staging[slot], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._side)
        torch.cuda.current_stream(self.device).wait_event(done)
        self._copies.append((slot, done))
        self._held = i
        return _to_float(self._dev[i])  # bf16/f16: converted on the device, half the bytes moved

    def _release(self) -> None:
        """The consumer asked for the next batch: it is done with the one it holds."""
        if self._held is None:
            return
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._dev_free[self._held] = ev
            self._drain_copies(all_of_them=False)
        else:
            self._pipe.release(self._held)
        self._held = None

    def _drain_copies(self, all_of_them: bool) -> None:
        """Give back the staging slots whose device copy has finished (all: wait for them)."""
        while self._copies and (all_of_them or self._copies[0][1].query()
                                or len(self._copies) >= STAGING_SLOTS - 1):
            slot, done = self._copies.popleft()
            done.synchronize()
            self._pipe.release(slot)

    # -- held-out chunks ------------------------------------------------------------------------
    def holdout(self, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        """The held-out chunks in chunk order, rows in order (special rows left out unless
        keep_special), float32 on the device; every batch is full except maybe the last. The
        clean stream for "clean" and "mix", the masked one for "masked". Fresh tensors."""
        B = self.batch_size if batch_size is None else batch_size
        if B < 1:
            raise PipelineError(f"holdout batch size must be at least 1, got {B}")
        name = activation_array("masked" if self.stream == "masked" else "clean", self.hook)
        R = self.manifest.rows_per_chunk
        chunk = torch.empty((R, self.d_model), dtype=self._dtype).numpy()
        out = torch.empty((B, self.d_model), dtype=self._dtype)
        filled = 0
        for k in self.holdout_chunk_ids:
            self.reader.read(name, k, chunk)
            tokens = self.reader.tokens(k) if self._special is not None else np.empty(R)
            rows = valid_rows(tokens, self._special)
            offset = 0
            while offset < rows.size:
                n = min(B - filled, rows.size - offset)
                gather(chunk, rows[offset:offset + n], out[filled:filled + n])
                filled, offset = filled + n, offset + n
                if filled == B:
                    yield _to_float(out.to(self.device, copy=True))
                    filled = 0
        if filled:
            yield _to_float(out[:filled].to(self.device, copy=True))

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the background threads (also done when the loader is garbage collected)."""
        self._finalizer()
        if self._cuda:
            self._side.synchronize()

    def __enter__(self) -> ActivationLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_args(m: Manifest, cache: str | Path, layer: int, stream: str, batch_size: int,
                start_step: int, window_chunks: int, holdout_chunks: int, mix_fraction: float,
                n_threads: int) -> None:
    if layer not in m.layers:
        raise PipelineError(f"layer {layer} is not in the cache {cache}, which holds layers "
                            f"{m.layers}: pick one of those or extract layer {layer}")
    if stream not in STREAMS:
        raise PipelineError(f"unknown stream {stream!r}: expected one of {', '.join(STREAMS)}")
    if not 0.0 <= mix_fraction <= 1.0:
        raise PipelineError(f"mix fraction must be in [0, 1], got {mix_fraction}")
    for name, value, least in (("batch size", batch_size, 1), ("window chunks", window_chunks, 1),
                               ("read threads", n_threads, 1), ("start step", start_step, 0)):
        if value < least:
            raise PipelineError(f"{name} must be at least {least}, got {value}")
    if not 0 <= holdout_chunks < m.n_chunks:
        raise PipelineError(f"holdout chunks must be in [0, {m.n_chunks}) for the {m.n_chunks} "
                            f"chunks of {cache}, got {holdout_chunks}: at least one chunk must "
                            "be left to train on")


def _to_float(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.int16:  # bfloat16 bit patterns
        return t.view(torch.bfloat16).float()
    return t if t.dtype == torch.float32 else t.float()
