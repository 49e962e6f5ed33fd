"""The loader: epochs visit every row once, seeded order, skip-to-step, holdout, mix, dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cache_schema import CacheError, activation_array, chunk_file, hook_name, read_manifest, write_manifest
from pipeline.data import ActivationLoader
from pipeline.data import loader as loader_module
from pipeline.data.synthetic import write_synthetic_cache
from pipeline.errors import PipelineError

R, CTX, D = 256, 32, 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader") / "cache"
    write_synthetic_cache(root, n_chunks=8, rows_per_chunk=R, d_model=D, layers=(0, 2),
                          context_length=CTX)
    return root


def rows_of(loader, n):
    return torch.cat([next(loader)[:, 0].clone() for _ in range(n)]).long()


def test_an_epoch_holds_every_non_special_row_exactly_once(cache):
    with ActivationLoader(cache, 0, batch_size=50, window_chunks=3) as loader:
        assert loader.rows_per_epoch == 8 * R - 8 * R // CTX
        batch = next(loader)
        assert batch.shape == (50, D) and batch.dtype == torch.float32
        n = math.ceil(2 * loader.rows_per_epoch / 50)
        seen = torch.cat([batch[:, 0].long(), rows_of(loader, n - 1)])
    epoch = seen[:loader.rows_per_epoch]
    assert len(set(epoch.tolist())) == loader.rows_per_epoch
    assert not torch.any(epoch % CTX == 0)  # BOS rows are left out
    second = seen[loader.rows_per_epoch:2 * loader.rows_per_epoch]
    assert set(second.tolist()) == set(epoch.tolist()) and not torch.equal(second, epoch)


def test_keep_special_keeps_bos_rows(cache):
    with ActivationLoader(cache, 0, batch_size=R, keep_special=True) as loader:
        rows = rows_of(loader, 8)
    assert loader.rows_per_epoch == 8 * R
    assert set(rows.tolist()) == set(range(8 * R))


def test_same_seed_same_batches_other_seed_other_batches(cache):
    def first(seed):
        with ActivationLoader(cache, 0, batch_size=64, seed=seed) as loader:
            return rows_of(loader, 10)
    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))


def test_start_step_continues_a_run_without_reading_skipped_windows(cache):
    with ActivationLoader(cache, 0, batch_size=64, window_chunks=2) as full:
        all_rows = rows_of(full, 60)
    with ActivationLoader(cache, 0, batch_size=64, window_chunks=2, start_step=45) as resumed:
        tail = rows_of(resumed, 15)
        reads = resumed.reader.reads
    assert torch.equal(tail, all_rows[45 * 64:])
    # steps 45..59 are rows 2880..3839: epoch 1 only, so epoch 0's four windows are never read
    assert reads <= 2 * 3 * 2 * 2  # at most (window + prefetch) x 2 chunks x (acts + tokens) x 2


def test_holdout_chunks_never_reach_training_and_holdout_yields_them(cache):
    with ActivationLoader(cache, 0, batch_size=100, holdout_chunks=2) as loader:
        train_rows = rows_of(loader, 60)
        held = torch.cat([b[:, 0] for b in loader.holdout(batch_size=64)]).long()
    assert loader.holdout_chunk_ids == [6, 7]
    assert train_rows.max() < 6 * R
    expected = [r for r in range(6 * R, 8 * R) if r % CTX]
    assert held.tolist() == expected


def test_mix_takes_whole_chunks_from_both_streams(cache):
    with ActivationLoader(cache, 0, stream="mix", batch_size=R - R // CTX, window_chunks=1,
                          seed=3) as loader:
        batches = [next(loader) for _ in range(40)]
    clean = read_rows(cache, "clean")
    kinds = set()
    for b in batches:
        rows = b[:, 0].long()
        is_clean = torch.equal(b, clean[rows])
        kinds.add(is_clean)
    assert kinds == {True, False}


def read_rows(cache, stream):
    m = read_manifest(cache)
    out = []
    for k in range(m.n_chunks):
        path = chunk_file(cache, activation_array(stream, hook_name(0)), 2, k)
        out.append(np.fromfile(path, dtype="<f4").reshape(R, D))
    return torch.from_numpy(np.concatenate(out))


@pytest.mark.parametrize(("dtype", "codec"), [("float16", "none"), ("bfloat16", "none"),
                                              ("float32", "zstd"), ("bfloat16", "blosc-lz4")])
def test_storage_dtypes_and_codecs_give_the_stored_values(tmp_path, cache, dtype, codec):
    root = tmp_path / "c"
    write_synthetic_cache(root, n_chunks=8, rows_per_chunk=R, d_model=D, layers=(0, 2),
                          context_length=CTX, storage_dtype=dtype, codec=codec)
    with ActivationLoader(root, 2, batch_size=64, seed=5) as a, \
            ActivationLoader(cache, 2, batch_size=64, seed=5) as b:
        for _ in range(5):
            x, ref = next(a), next(b).clone()
            tol = {"float32": 0, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
            torch.testing.assert_close(x[:, 1:], ref[:, 1:], rtol=tol, atol=tol)


def test_norm_scale_is_sqrt_d_over_the_mean_norm(cache):
    m = read_manifest(cache)
    stats = m.norm_stats[hook_name(0)]
    with ActivationLoader(cache, 0) as loader:
        assert loader.norm_scale == pytest.approx(math.sqrt(D) / stats["clean"]["mean_norm"])
    with ActivationLoader(cache, 0, stream="mix", mix_fraction=0.25) as loader:
        mean = 0.75 * stats["clean"]["mean_norm"] + 0.25 * stats["masked"]["mean_norm"]
        assert loader.norm_scale == pytest.approx(math.sqrt(D) / mean)


def test_clear_errors(cache, tmp_path):
    with pytest.raises(PipelineError, match=r"layer 1 is not in the cache.*\[0, 2\]"):
        ActivationLoader(cache, 1)
    with pytest.raises(PipelineError, match="unknown stream"):
        ActivationLoader(cache, 0, stream="dirty")
    with pytest.raises(PipelineError, match="nothing to train on"):
        ActivationLoader(cache, 0, holdout_chunks=8)
    root = tmp_path / "trunc"
    write_synthetic_cache(root, n_chunks=2, rows_per_chunk=R, d_model=D, context_length=CTX)
    path = chunk_file(root, activation_array("clean", hook_name(0)), 2, 1)
    path.write_bytes(path.read_bytes()[:-10])
    with ActivationLoader(root, 0, batch_size=R, window_chunks=1) as loader, \
            pytest.raises(PipelineError, match=r"chunk 1 .*wrong size.*pipeline verify"):
        for _ in range(4):
            next(loader)
    m = read_manifest(root)
    m.status = "writing"
    write_manifest(root, m)
    with pytest.raises(CacheError, match="not complete"):
        ActivationLoader(root, 0)


def test_pinning_only_when_batches_go_to_a_usable_gpu(cache, monkeypatch):
    calls = []
    real = torch.empty

    def spy(*args, pin_memory=False, **kw):
        calls.append(pin_memory)
        return real(*args, **kw)
    monkeypatch.setattr(loader_module.torch, "empty", spy)
    with ActivationLoader(cache, 0, batch_size=32):
        pass
    assert calls and not any(calls)
    calls.clear()
    with ActivationLoader(cache, 0, batch_size=32, pin=True):
        pass
    assert calls and all(calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches(cache):
    with ActivationLoader(cache, 0, batch_size=64, device="cuda") as g, \
            ActivationLoader(cache, 0, batch_size=64) as c:
        for _ in range(20):
            assert torch.equal(next(g).cpu(), next(c))
