"""The order of training rows, as pure functions of (seed, epoch, window): no state, so a run can
start at any step by arithmetic on the chunk sizes alone.

Epoch e visits the training chunks in the order default_rng([seed, e]).permutation(chunks);
consecutive groups of `window_chunks` of them form windows; inside window w the valid rows (chunk
by chunk, special rows removed) are permuted with default_rng([seed, e, w, 0]). The global stream
is epoch 0's windows, then epoch 1's, ...; batch i is rows [i*B, (i+1)*B) of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_windows(chunks: list[int], seed: int, epoch: int, window_chunks: int) -> list[list[int]]:
    order = np.random.default_rng([seed, epoch]).permutation(np.asarray(chunks, dtype=np.int64))
    return [order[i:i + window_chunks].tolist() for i in range(0, len(order), window_chunks)]


def window_permutation(seed: int, epoch: int, window: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, window, 0]).permutation(n)


def chunk_is_masked(seed: int, epoch: int, chunk: int, mix_fraction: float) -> bool:
    """With --stream mix: does this chunk come from the masked stream in this epoch."""
    return bool(np.random.default_rng([seed, epoch, chunk, 1]).random() < mix_fraction)


@dataclass
class Position:
    epoch: int
    window: int
    offset: int


class RowPlan:
    """Window sizes of every epoch, from the per-chunk valid-row counts."""

    def __init__(self, chunks: list[int], counts: dict[int, int], seed: int, window_chunks: int):
        self.chunks, self.counts, self.seed, self.window_chunks = chunks, counts, seed, window_chunks
        self.rows_per_epoch = sum(counts[k] for k in chunks)

    def windows(self, epoch: int) -> list[list[int]]:
        return epoch_windows(self.chunks, self.seed, epoch, self.window_chunks)

    def locate(self, row: int) -> Position:
        """Which epoch and window global row `row` falls in, and its offset inside the window."""
        epoch, rest = divmod(row, self.rows_per_epoch)
        for w, window in enumerate(self.windows(epoch)):
            size = sum(self.counts[k] for k in window)
            if rest < size:
                return Position(epoch, w, rest)
            rest -= size
        raise AssertionError("row beyond the epoch")  # unreachable: rest < rows_per_epoch
