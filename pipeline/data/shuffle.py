"""The order of training rows, as pure functions of (seed, epoch, window): no state, so a run can
start at any step by arithmetic on the chunk sizes alone.

Epoch e visits the training chunks in the order default_rng([seed, e]).permutation(chunks);
consecutive groups of `window_chunks` of them form windows (the last may be smaller); inside
window w the valid rows (chunk by chunk in window order, rows in order, special rows removed) are
permuted with default_rng([seed, e, w, 0]). The global stream is epoch 0's windows, then epoch
1's, ...; batch i is rows [i*B, (i+1)*B) of it. With stream "mix", chunk k of epoch e comes from
the masked stream iff default_rng([seed, e, k, 1]).random() < mix_fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_windows(chunks: list[int], seed: int, epoch: int, window_chunks: int) -> list[list[int]]:
    """The chunks of each window of an epoch, in reading order."""
    order = np.random.default_rng([seed, epoch]).permutation(np.asarray(chunks, dtype=np.int64))
    return [order[i:i + window_chunks].tolist() for i in range(0, len(order), window_chunks)]


def window_permutation(seed: int, epoch: int, window: int, n: int) -> np.ndarray:
    """Order of the n valid rows of a window."""
    return np.random.default_rng([seed, epoch, window, 0]).permutation(n)


def chunk_is_masked(seed: int, epoch: int, chunk: int, mix_fraction: float) -> bool:
    """With stream "mix": does this chunk come from the masked stream in this epoch."""
    return bool(np.random.default_rng([seed, epoch, chunk, 1]).random() < mix_fraction)


def valid_rows(tokens: np.ndarray, special_ids: np.ndarray | None) -> np.ndarray:
    """Rows of a chunk that training uses: those whose clean token is not special (all rows
    when special_ids is None, i.e. keep_special)."""
    if special_ids is None:
        return np.arange(len(tokens), dtype=np.int64)
    return np.flatnonzero(~np.isin(tokens, special_ids))


def window_order(valid: list[np.ndarray], rows_per_chunk: int, seed: int, epoch: int,
                 window: int) -> np.ndarray:
    """Shuffled row indices into a window buffer that holds the window's chunks back to back
    (chunk i at rows [i*R, (i+1)*R)), given each chunk's valid rows."""
    rows = np.concatenate([v + i * rows_per_chunk for i, v in enumerate(valid)])
    return rows[window_permutation(seed, epoch, window, rows.size)]


@dataclass
class Position:
    epoch: int
    window: int
    offset: int
    """Rows of the window's shuffled order already consumed."""


class RowPlan:
    """Window sizes of every epoch, from the per-chunk valid-row counts (chunk metadata)."""

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

    def windows_from(self, position: Position):
        """(epoch, window index, chunks) of every window from `position` on, forever."""
        epoch, w = position.epoch, position.window
        while True:
            windows = self.windows(epoch)
            for i in range(w, len(windows)):
                yield epoch, i, windows[i]
            epoch, w = epoch + 1, 0
