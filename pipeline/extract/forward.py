"""The forward passes of extraction: the truncated model over batches of clean + masked sequences,
each stored layer's output cast to the storage dtype with its row norms, brought to the host.
On CUDA the copies go to pinned memory on a copy stream, so batch i+1's forward is queued while
batch i is copied; a batch's results are handed out once the next one is running."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cache_schema import STREAMS
from cache_schema.dtypes import read_dtype, storage_dtype
from pipeline import models


@dataclass
class Batch:
    """The host results of one forward pass: per layer, activations [2, rows, D] in the storage
    dtype and norms [2, rows] in float32 (stream 0 clean, 1 masked)."""

    tag: object
    acts: dict[int, np.ndarray]
    norms: dict[int, np.ndarray]


class Forward:
    """Hooks on the stored layers of `base`; `run` maps (tag, ids [2n, L]) batches to Batches."""

    def __init__(self, base, layers: list[int], storage: str):
        self.base, self.layers, self.storage = base, layers, storage
        self.device = models.input_device(base)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._captured: dict[int, torch.Tensor] = {}
        blocks = models.decoder_layers(base)
        self._handles = [blocks[layer].register_forward_hook(self._hook(layer))
                         for layer in layers]

    def _hook(self, layer: int):
        def fn(_module, _inputs, output):
            self._captured[layer] = output[0] if isinstance(output, tuple) else output
        return fn

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def run(self, batches: Iterable[tuple[object, np.ndarray]]) -> Iterator[Batch]:
        pending = None
        for tag, ids in batches:
            launched = self._launch(tag, ids)
            if pending is not None:
                yield self._collect(*pending)
            pending = launched
        if pending is not None:
            yield self._collect(*pending)

    def _launch(self, tag, ids: np.ndarray):
        """Queue the forward of one batch and the copies of its results to the host."""
        ids_t = torch.from_numpy(ids).to(self.device, dtype=torch.long, non_blocking=True)
        with torch.inference_mode():
            self.base(input_ids=ids_t, use_cache=False)
            out = {}
            for layer in self.layers:
                h = self._captured.pop(layer)
                h = h.reshape(len(STREAMS), -1, h.shape[-1])
                out[layer] = (h.to(getattr(torch, self.storage)), h.float().norm(dim=-1))
        if not self.cuda:
            return tag, out, None
        current = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(current)
        host = {}
        with torch.cuda.stream(self.copy_stream):
            for layer, (acts, norms) in out.items():
                pair = (torch.empty(acts.shape, dtype=acts.dtype, pin_memory=True),
                        torch.empty(norms.shape, dtype=norms.dtype, pin_memory=True))
                pair[0].copy_(acts, non_blocking=True)
                pair[1].copy_(norms, non_blocking=True)
                acts.record_stream(self.copy_stream)  # freed only once the copy has run
                norms.record_stream(self.copy_stream)
                host[layer] = pair
        done = torch.cuda.Event()
        done.record(self.copy_stream)
        return tag, host, done

    def _collect(self, tag, out: dict, done) -> Batch:
        if done is not None:
            done.synchronize()
        view = getattr(torch, read_dtype(self.storage))  # bfloat16 travels as uint16
        acts = {layer: a.view(view).numpy().view(storage_dtype(self.storage))
                for layer, (a, _) in out.items()}
        norms = {layer: n.numpy() for layer, (_, n) in out.items()}
        return Batch(tag, acts, norms)
