"""Streaming per-latent statistics for the feature browser: one pass over held-out chunks, rows in
cache order, memory bounded by the chosen latents (never by the cache size).

Per chosen latent this keeps the number of tokens it fires on, a fixed-size histogram of its
non-zero activations, and its top-N activations with the token ids and activations of the M
tokens either side (within the same sequence). Chunks hold whole sequences (SPEC.md §2), so the
context of any row lies in the block of sequences it was read with.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

N_BINS = 32  # a power of two, so that doubling a bin width merges bins pairwise
PAD = -1  # token id of context positions outside the sequence
BLOCK_FLOATS = 1 << 24  # z values of one block of sequences held at once (64 MiB of float32)


@dataclass
class Block:
    """Consecutive whole sequences: activations [rows, d_in], token ids [rows], global row ids."""

    x: torch.Tensor
    tokens: np.ndarray
    first_row: int


def encode_selected(sae, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Activations [rows, len(latents)] of the chosen latents (pipeline.sae.inference.InferenceSAE)."""
    return sae.encode(x, latents)


class Histogram:
    """Counts of non-zero activations per latent in N_BINS bins of width w (bin j holds
    [j*w, (j+1)*w)). w starts as the smallest power of two with N_BINS*w >= the first values
    seen and doubles (merging bins pairwise, exactly) whenever a larger value arrives: bounded
    memory, one pass, no second read."""

    def __init__(self, n_latents: int):
        self.counts = torch.zeros(n_latents, N_BINS, dtype=torch.int64)
        self.width = torch.zeros(n_latents, dtype=torch.float64)  # 0: nothing seen yet

    def add(self, z: torch.Tensor) -> None:
        top = z.amax(0).double()
        need = torch.where(top > 0, torch.exp2(torch.ceil(torch.log2(top / N_BINS))), 0.0)
        fresh = (self.width == 0) & (need > 0)
        self.width[fresh] = need[fresh]
        grow = (need > self.width) & ~fresh
        for i in grow.nonzero().flatten().tolist():
            factor = round(float(need[i] / self.width[i]))
            merged = torch.zeros(N_BINS, dtype=torch.int64)
            if factor < N_BINS:
                merged[:N_BINS // factor] = self.counts[i].view(N_BINS // factor, factor).sum(1)
            else:
                merged[0] = self.counts[i].sum()
            self.counts[i], self.width[i] = merged, need[i]
        rows, cols = (z > 0).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        values = z[rows, cols].double()
        bins = torch.floor(values / self.width[cols]).long().clamp_(0, N_BINS - 1)
        self.counts.view(-1).index_add_(0, cols * N_BINS + bins,
                                        torch.ones_like(bins, dtype=torch.int64))


class TopExamples:
    """The n largest activations per latent so far, with context: values [L, n], global rows
    [L, n], context token ids [L, n, 2m+1] (PAD outside the sequence) and the latent's
    activations on the context [L, n, 2m+1]. Entries with value 0 are empty slots."""

    def __init__(self, n_latents: int, n: int, m: int):
        self.n, self.m = n, m
        self.values = torch.zeros(n_latents, n)
        self.rows = torch.full((n_latents, n), -1, dtype=torch.int64)
        self.context = torch.full((n_latents, n, 2 * m + 1), PAD, dtype=torch.int32)
        self.context_acts = torch.zeros(n_latents, n, 2 * m + 1)

    def add(self, z: torch.Tensor, tokens: torch.Tensor, first_row: int, seq_len: int) -> None:
        """z [rows, L]: one block of whole sequences; tokens [rows] its token ids."""
        rows = z.shape[0]
        k = min(self.n, rows)
        vals, idx = z.topk(k, dim=0)  # [k, L]
        vals, idx = vals.T, idx.T  # [L, k]
        offsets = torch.arange(-self.m, self.m + 1)
        pos = idx.unsqueeze(-1) + offsets  # [L, k, 2m+1], block-local rows
        inside = (pos // seq_len == (idx // seq_len).unsqueeze(-1)) & (pos >= 0) & (pos < rows)
        pos = pos.clamp(0, rows - 1)
        ctx = torch.where(inside, tokens[pos], torch.tensor(PAD, dtype=torch.int32))
        lat = torch.arange(z.shape[1]).view(-1, 1, 1).expand_as(pos)
        ctx_acts = torch.where(inside, z[pos, lat], 0.0)
        all_vals = torch.cat([self.values, vals], 1)
        keep = all_vals.topk(self.n, dim=1).indices  # [L, n]
        self.values = all_vals.gather(1, keep)
        self.rows = torch.cat([self.rows, idx + first_row], 1).gather(1, keep)
        wide = keep.unsqueeze(-1).expand(-1, -1, 2 * self.m + 1)
        self.context = torch.cat([self.context, ctx], 1).gather(1, wide)
        self.context_acts = torch.cat([self.context_acts, ctx_acts], 1).gather(1, wide)


@dataclass
class LatentStats:
    """What one pass collects: per latent (in the order of `latents`) fired counts, histogram,
    top examples; `tokens` is the number of tokens scanned (special tokens left out)."""

    latents: list[int]
    tokens: int
    fired: torch.Tensor
    max_act: torch.Tensor
    hist: Histogram
    top: TopExamples


@torch.no_grad()
def collect(sae, blocks: Iterable[Block], latents: list[int], n_examples: int, context: int,
            seq_len: int, special_ids: list[int], device: str = "cpu",
            progress=None) -> LatentStats:
    """One pass over the blocks. Special tokens (BOS, EOS, ...) are not scanned: their residuals
    are outliers (see SPEC.md §6) and would fill every latent's top examples; they still show in
    the context of other tokens. progress(rows) is called after each block."""
    idx = torch.tensor(latents, dtype=torch.int64, device=device)
    n = len(latents)
    fired = torch.zeros(n, dtype=torch.int64)
    max_act = torch.zeros(n)
    hist, top = Histogram(n), TopExamples(n, n_examples, context)
    special = np.asarray(special_ids, dtype=np.int64)
    scanned = 0
    for block in blocks:
        z = encode_selected(sae, block.x.to(device), idx).float().cpu()
        regular = torch.from_numpy(~np.isin(block.tokens, special))
        z[~regular] = 0.0
        scanned += int(regular.sum())
        fired += (z > 0).sum(0)
        max_act = torch.maximum(max_act, z.amax(0))
        hist.add(z)
        top.add(z, torch.from_numpy(block.tokens.astype(np.int32)), block.first_row, seq_len)
        if progress is not None:
            progress(len(block.tokens))
    return LatentStats(latents, scanned, fired, max_act, hist, top)


def block_rows(seq_len: int, rows_per_chunk: int, n_latents: int) -> int:
    """Rows per block: whole sequences, at most a chunk, z of the chosen latents <= BLOCK_FLOATS."""
    seqs = max(1, BLOCK_FLOATS // (seq_len * max(n_latents, 1)))
    return min(rows_per_chunk, seqs * seq_len)


def read_blocks(reader, array: str, chunks: list[int], rows_per_chunk: int, d_model: int,
                np_dtype: np.dtype, bfloat16: bool, block: int,
                max_rows: int | None = None) -> Iterator[Block]:
    """Blocks of `block` rows of the chunks in order (rows in cache order, no shuffling), read
    with the loader's ChunkReader; stops once max_rows rows are read (whole blocks)."""
    buf = np.empty((rows_per_chunk, d_model), dtype=np_dtype)
    done = 0
    for k in chunks:
        reader.read(array, k, buf)
        tokens = reader.tokens(k)
        for lo in range(0, rows_per_chunk, block):
            if max_rows is not None and done >= max_rows:
                return
            x = torch.from_numpy(buf[lo:lo + block].copy())
            x = x.view(torch.bfloat16).float() if bfloat16 else x.float()
            yield Block(x, tokens[lo:lo + block], k * rows_per_chunk + lo)
            done += len(x)
