"""Forward batches larger than a chunk (SPEC.md §3): whole groups of chunks per batch, the same
values as chunk-sized batches, and the same bytes after a resume that recomputes a group."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cache_schema import activation_array, hook_name, read_manifest, write_manifest
from pipeline.errors import PipelineError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.run import extract
from pipeline.processes import Workers

# 8 sequences of 32 tokens per chunk; 5 chunks, so the last group of two is one chunk short
BASE = dict(layers=[1], tokens=5 * 256, context_length=32, rows_per_chunk=256, device="cpu")


def run(out, model, corpus, batch_size):
    cfg = ExtractConfig(out=str(out), model=str(model), corpus=str(corpus),
                        batch_size=batch_size, **BASE)
    return extract(cfg, progress=False)


def acts(root, stream="clean"):
    return zarr.open_array(str(root / activation_array(stream, hook_name(1))), mode="r")[:]


@pytest.mark.slow
def test_batches_of_two_chunks_give_the_values_of_chunk_batches(tmp_path, tiny_model, corpus):
    m = run(tmp_path / "wide", tiny_model, corpus, batch_size=16)
    assert m.chunks_per_batch == 2 and m.n_chunks == 5
    run(tmp_path / "narrow", tiny_model, corpus, batch_size=8)
    for stream in ("clean", "masked"):
        np.testing.assert_allclose(acts(tmp_path / "wide", stream),
                                   acts(tmp_path / "narrow", stream), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_resume_recomputes_the_whole_group_and_writes_the_same_bytes(tmp_path, tiny_model,
                                                                       corpus):
    root = tmp_path / "cache"
    run(root, tiny_model, corpus, batch_size=16)
    chunk3 = root / activation_array("masked", hook_name(1)) / "c" / "3" / "0"
    before = chunk3.read_bytes()
    m = read_manifest(root)
    m.status, m.norm_stats, m.chunks_digest = "writing", {}, None
    write_manifest(root, m)
    (root / "_chunks" / "00000003.json").unlink()  # chunk 2 of its group stays done
    chunk3.write_bytes(before[:100])
    run(root, tiny_model, corpus, batch_size=16)
    assert chunk3.read_bytes() == before


def test_processes_are_dealt_whole_groups():
    chunks = list(range(7))
    dealt = [Workers(rank=r, world=2).mine(chunks, per_batch=2) for r in (0, 1)]
    assert dealt == [[0, 1, 4, 5], [2, 3, 6]]


def test_a_batch_spanning_chunks_must_be_whole_chunks():
    with pytest.raises(PipelineError, match="multiple of 8"):
        ExtractConfig(batch_size=12, **BASE)
