"""A small, valid, complete cache of random activations, for tests and benchmarks: real manifest,
chunk records, checksums and norm statistics, written through cache_schema's own writer, so
that cache_schema.verify passes. Row r of layer L has activation[:, 0] = r + L/4 in both streams (so
tests can see which rows a batch holds; the masked stream is the clean one plus noise in the
other columns); BOS rows (position 0 of each sequence) have ~100x the norm of the rest, as in
real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache_schema.dtypes import decode, encode
from cache_schema.manifest import Manifest, hook_name
from cache_schema.store import (
    IS_MASKED,
    MASKED_TOKENS,
    SEQ,
    TOKENS,
    activation_array,
    chunk_stats,
    write_manifest,
)
from cache_schema.write import finalize, open_arrays, write_chunk

BOS, VOCAB = 1, 1000


def write_synthetic_cache(root: str | Path, n_chunks: int = 8, rows_per_chunk: int = 1024,
                          d_model: int = 64, layers: tuple[int, ...] = (0,),
                          context_length: int = 64, storage_dtype: str = "float32",
                          codec: str = "none", seed: int = 0,
                          index_column: bool = True, distinct_chunks: int | None = None
                          ) -> Manifest:
    """Write the cache and return its manifest; index_column=False leaves column 0 random (for
    training benchmarks); distinct_chunks=n repeats the activations of the first n chunks
    (chunk k holds those of k % n: caches of tens of GB for benchmarks, written at disk speed
    rather than random-number speed; needs index_column=False)."""
    if distinct_chunks is not None and index_column:
        raise ValueError("distinct_chunks repeats activations: the index column would lie")
    root = Path(root)
    n_seq = n_chunks * rows_per_chunk // context_length
    m = Manifest(
        model_name="synthetic", model_fingerprint=f"synthetic-{seed}", model_revision=None,
        compute_dtype="float32", device_type="cpu", layers=list(layers),
        n_model_layers=max(layers) + 1, d_model=d_model, context_length=context_length,
        n_sequences=n_seq, rows_per_chunk=rows_per_chunk, batch_size=1,
        storage_dtype=storage_dtype, codec=codec, mask_rate=0.3, mask_strategy="mask-token",
        mask_token_id=2, mask_seed=seed, bos_token_id=BOS, special_token_ids=[0, BOS, 2],
        tokenizer_hash="synthetic", corpus_source="synthetic", corpus_fingerprint=f"seed-{seed}")
    write_manifest(root, m)
    arrays = open_arrays(root, m)
    rng = np.random.default_rng(seed)
    R = rows_per_chunk
    repeats: list[tuple[dict, dict]] = []  # activations and norms of the distinct chunks
    for k in range(n_chunks):
        rows = np.arange(k * R, (k + 1) * R)
        tokens = rng.integers(3, VOCAB, R).astype(np.int32)
        bos = rows % context_length == 0
        tokens[bos] = BOS
        is_masked = (rng.random(R) < 0.3) & ~bos
        masked_tokens = np.where(is_masked, 2, tokens).astype(np.int32)
        data = {TOKENS: tokens, MASKED_TOKENS: masked_tokens, IS_MASKED: is_masked,
                SEQ: (rows // context_length).astype(np.int32)}
        if distinct_chunks is not None and k >= distinct_chunks:
            first = repeats[k % distinct_chunks]
            data.update(first[0])
            write_chunk(root, m, arrays, k, data, chunk_stats(
                first[1], np.isin(tokens, m.special_token_ids)))
            continue
        norms = {}
        for layer in layers:
            clean = rng.normal(size=(R, d_model)).astype(np.float32)
            clean[bos] *= 100.0
            if index_column:
                clean[:, 0] = rows + layer * 0.25
            masked = clean + 0.1 * rng.normal(size=clean.shape).astype(np.float32)
            if index_column:
                masked[:, 0] = clean[:, 0]
            h = hook_name(layer)
            norms[h] = {}
            for stream, x in (("clean", clean), ("masked", masked)):
                stored = encode(x, storage_dtype)
                data[activation_array(stream, h)] = stored
                norms[h][stream] = np.linalg.norm(decode(stored, storage_dtype), axis=1)
        write_chunk(root, m, arrays, k, data, chunk_stats(norms, np.isin(tokens, m.special_token_ids)))
        if distinct_chunks is not None:
            repeats.append(({a: v for a, v in data.items() if "/" in a}, norms))
    return finalize(root, m)

