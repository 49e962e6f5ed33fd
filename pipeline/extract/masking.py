"""Input masking (arXiv 2604.06495): replace random input tokens, reproducibly per sequence."""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError


def mask_sequences(tokens: np.ndarray, first_seq: int, rate: float, strategy: str,
                   mask_token_id: int, seed: int, protected_ids: list[int],
                   vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Masked copy of tokens [n, L] and the boolean mask of replaced positions.

    Sequence s (global index first_seq + row) draws from numpy default_rng([seed, s]) so any
    subset of sequences is masked the same way whatever the batching or resume point. Positions
    holding a protected id (BOS and the other special tokens) are never replaced; random-token
    replacements are drawn from the non-protected vocabulary.
    """
    protected = np.asarray(sorted(protected_ids), dtype=np.int64)
    candidates = None
    if strategy == "random-token":
        candidates = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), protected)
    masked = tokens.copy()
    is_masked = np.zeros(tokens.shape, dtype=bool)
    for row in range(tokens.shape[0]):
        rng = np.random.default_rng([seed, first_seq + row])
        m = rng.random(tokens.shape[1]) < rate
        m &= ~np.isin(tokens[row], protected)
        m[0] = False  # BOS
        if candidates is None:
            masked[row, m] = mask_token_id
        else:
            masked[row, m] = candidates[rng.integers(0, len(candidates), size=int(m.sum()))]
        is_masked[row] = m
    return masked, is_masked


def choose_mask_token(tok, mask_token: str | None) -> int:
    """Id of the mask token: the one given, else the tokenizer's mask, a reserved special, unk, eos."""
    vocab = tok.get_vocab()
    if mask_token is not None:
        if mask_token.isdigit() and int(mask_token) < len(tok):
            return int(mask_token)
        if mask_token in vocab:
            return vocab[mask_token]
        raise PipelineError(f"mask token {mask_token!r} is not in the tokenizer's vocabulary "
                            "(give a token string or an integer id)")
    for cand in (tok.mask_token, "<|reserved_special_token_0|>", tok.unk_token, tok.eos_token):
        if cand is not None and cand in vocab:
            return vocab[cand]
    raise PipelineError("the tokenizer has no mask, reserved, unk or eos token: pass --mask-token")
