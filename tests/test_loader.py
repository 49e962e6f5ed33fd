"""The loader: epochs visit every row once in the documented seeded order, resume, holdout, mix,
dtypes and codecs, errors, pinning, thread shutdown."""

from __future__ import annotations

import gc
import math
import subprocess
import sys
import threading
import time
from functools import partial

import numpy as np
import pytest
import torch
import zarr

from cache_schema import (
    CacheError,
    activation_array,
    chunk_file,
    hook_name,
    read_manifest,
    verify,
    write_manifest,
)
from cache_schema.synthetic import write_synthetic_cache
from pipeline import data
from pipeline.data import ActivationLoader, background
from pipeline.data import loader as loader_module
from pipeline.errors import PipelineError

R, CTX, D, K = 256, 32, 8, 8
VALID = R - R // CTX  # non-special rows per chunk (BOS at position 0 of each sequence)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader") / "cache"
    write_synthetic_cache(root, n_chunks=K, rows_per_chunk=R, d_model=D, layers=(0, 2),
                          context_length=CTX)
    return root


@pytest.fixture(params=["mapped", "read"])
def path(request, monkeypatch):
    """Run a test through both window kinds: memory-mapped chunk files and read buffers (the
    loaders this module builds take `mapped` from here)."""
    loader = partial(data.ActivationLoader, mapped=request.param == "mapped")
    monkeypatch.setitem(globals(), "ActivationLoader", loader)
    return request.param


def rows_of(loader, n):
    """Global row index (column 0 of the synthetic cache) of the rows of the next n batches."""
    return torch.cat([next(loader)[:, 0].clone() for _ in range(n)]).long()


def rule_windows(seed, epoch, chunks, window_chunks):
    """The documented chunk order of an epoch, cut into windows (written out, not imported)."""
    order = np.random.default_rng([seed, epoch]).permutation(chunks).tolist()
    return [order[i:i + window_chunks] for i in range(0, len(order), window_chunks)]


def expected_stream(seed, chunks, window_chunks, n_rows):
    """The global row stream, straight from the documented rule."""
    out, epoch = [], 0
    while sum(map(len, out)) < n_rows:
        for w, window in enumerate(rule_windows(seed, epoch, chunks, window_chunks)):
            rows = np.concatenate([np.arange(k * R, (k + 1) * R) for k in window])
            rows = rows[rows % CTX != 0]  # special (BOS) rows left out
            out.append(rows[np.random.default_rng([seed, epoch, w, 0]).permutation(rows.size)])
        epoch += 1
    return np.concatenate(out)[:n_rows]


def test_synthetic_cache_is_valid(cache):
    m, problems = verify(cache)
    assert problems == [] and m.status == "complete"
    assert m.norm_stats[hook_name(0)]["clean"]["count"] == K * VALID


def test_batches_follow_the_documented_order_across_windows_and_epochs(cache, path):
    with ActivationLoader(cache, 0, batch_size=100, window_chunks=3, seed=7) as loader:
        batches = [next(loader).clone() for _ in range(45)]  # 4500 rows: into epoch 3
    assert all(b.shape == (100, D) and b.dtype == torch.float32 for b in batches)
    rows = torch.cat([b[:, 0] for b in batches]).long().numpy()
    np.testing.assert_array_equal(rows, expected_stream(7, list(range(K)), 3, 4500))


def test_an_epoch_holds_every_non_special_row_exactly_once(cache):
    with ActivationLoader(cache, 0, batch_size=50, window_chunks=3) as loader:
        assert loader.rows_per_epoch == K * VALID
        seen = rows_of(loader, math.ceil(2 * K * VALID / 50))
    every = {r for r in range(K * R) if r % CTX}
    first, second = seen[:K * VALID], seen[K * VALID:2 * K * VALID]
    assert len(set(first.tolist())) == K * VALID and set(first.tolist()) == every
    assert set(second.tolist()) == every and not torch.equal(first, second)


def test_keep_special_keeps_bos_rows(cache):
    with ActivationLoader(cache, 0, batch_size=R, keep_special=True) as loader:
        assert loader.rows_per_epoch == K * R
        rows = rows_of(loader, K)
    assert sorted(rows.tolist()) == list(range(K * R))


def test_same_seed_same_batches_other_seed_other_batches(cache):
    def first(seed):
        with ActivationLoader(cache, 0, batch_size=64, seed=seed) as loader:
            return rows_of(loader, 10)
    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))


def test_start_step_continues_a_run_and_reads_only_the_windows_it_needs(cache, path):
    B, W, s, n = 64, 2, 45, 15
    with ActivationLoader(cache, 0, batch_size=B, window_chunks=W) as full:
        full.reader.log = []
        all_rows = rows_of(full, s + n)
        fresh_reads = len(full.reader.log)
    with ActivationLoader(cache, 0, batch_size=B, window_chunks=W, start_step=s) as resumed:
        assert resumed.step == s
        resumed.reader.log = []
        tail = rows_of(resumed, n)
        assert resumed.step == s + n
        log = list(resumed.reader.log)
    assert torch.equal(tail, all_rows[s * B:])
    # row s*B = 2880 lies in epoch 1 (1984 rows per epoch), window 1 (4 windows of 496 rows)
    pos = resumed.plan.locate(s * B)
    assert (pos.epoch, pos.window, pos.offset) == (1, 1, 2880 - 1984 - 496)
    windows = rule_windows(0, 1, list(range(K)), W) + rule_windows(0, 2, list(range(K)), W)
    acts = [k for name, k in log if name != "tokens"]
    assert set(acts[:W]) == set(windows[1])  # the first read is the window of step s
    # rows up to 3840 end in epoch 1's window 3; at most two windows are read ahead
    assert len(acts) <= W * (3 + 2)
    for i in range(0, len(acts), W):  # window by window (a window's chunks are read in parallel)
        assert set(acts[i:i + W]) <= set(windows[1 + i // W])
    assert len(log) < fresh_reads


def test_holdout_chunks_never_reach_training_and_holdout_yields_them(cache, path):
    with ActivationLoader(cache, 0, batch_size=100, holdout_chunks=2) as loader:
        assert loader.train_chunks == list(range(6)) and loader.holdout_chunk_ids == [6, 7]
        assert loader.rows_per_epoch == 6 * VALID
        train_rows = rows_of(loader, 60)  # 6000 rows: four epochs
        held = list(loader.holdout(batch_size=64))
    assert train_rows.max() < 6 * R
    assert [len(b) for b in held] == [64] * 7 + [2 * VALID - 7 * 64]
    assert all(b.dtype == torch.float32 and b.shape[1] == D for b in held)
    assert torch.cat(held)[:, 0].long().tolist() == [r for r in range(6 * R, 8 * R) if r % CTX]
    with ActivationLoader(cache, 0, holdout_chunks=2, keep_special=True) as loader:
        held = torch.cat(list(loader.holdout()))
    assert held[:, 0].long().tolist() == list(range(6 * R, 8 * R))


def stored_rows(root, stream, layer=0):
    """Every row of one stream, decoded from the cache as SPEC.md says (zarr + numpy)."""
    m = read_manifest(root)
    data = zarr.open_array(str(root / activation_array(stream, hook_name(layer))), mode="r")[:]
    if m.storage_dtype == "bfloat16":
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return torch.from_numpy(data.astype(np.float32))


def test_mix_takes_whole_chunks_from_both_streams_at_about_the_fraction(cache):
    clean, masked = stored_rows(cache, "clean"), stored_rows(cache, "masked")
    epochs, p = 12, 0.3
    with ActivationLoader(cache, 0, stream="mix", mix_fraction=p, batch_size=VALID,
                          window_chunks=1, seed=3) as loader:
        batches = [next(loader) .clone() for _ in range(epochs * K)]  # one chunk per batch
    picks = []
    for i, b in enumerate(batches):
        rows = b[:, 0].long()
        k = int(rows[0]) // R
        assert torch.all(rows // R == k)
        is_masked = torch.equal(b, masked[rows])
        assert is_masked or torch.equal(b, clean[rows])
        assert is_masked == (np.random.default_rng([3, i // K, k, 1]).random() < p)
        picks.append(is_masked)
    assert abs(np.mean(picks) - p) < 0.15


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_storage_gives_exactly_the_stored_values(tmp_path, cache, dtype, path):
    root = tmp_path / dtype
    write_synthetic_cache(root, n_chunks=K, rows_per_chunk=R, d_model=D, layers=(0, 2),
                          context_length=CTX, storage_dtype=dtype)
    stored = stored_rows(root, "clean")
    # same seed, same tokens: the float32 twin's index column says which rows a batch holds
    with ActivationLoader(root, 0, batch_size=64, seed=5) as half, \
            ActivationLoader(cache, 0, batch_size=64, seed=5) as ref:
        for _ in range(40):
            x, rows = next(half), next(ref)[:, 0].long()
            assert x.dtype == torch.float32
            assert torch.equal(x, stored[rows])


@pytest.mark.parametrize(("dtype", "codec"), [("float32", "zstd"), ("bfloat16", "blosc-lz4")])
def test_compressed_caches_give_the_same_batches(tmp_path, dtype, codec):
    def batches(root):
        with ActivationLoader(root, 2, batch_size=64, seed=5, window_chunks=3) as loader:
            return [next(loader).clone() for _ in range(40)]
    kw = dict(n_chunks=K, rows_per_chunk=R, d_model=D, layers=(0, 2), context_length=CTX,
              storage_dtype=dtype)
    write_synthetic_cache(tmp_path / "plain", **kw)
    write_synthetic_cache(tmp_path / "packed", codec=codec, **kw)
    assert read_manifest(tmp_path / "packed").codec == codec
    for a, b in zip(batches(tmp_path / "plain"), batches(tmp_path / "packed"), strict=True):
        assert torch.equal(a, b)


def test_norm_scale_is_sqrt_d_over_the_mean_norm(cache):
    stats = read_manifest(cache).norm_stats[hook_name(0)]
    clean, masked = stats["clean"]["mean_norm"], stats["masked"]["mean_norm"]
    assert clean != masked
    for stream, frac, mean in (("clean", 0.5, clean), ("masked", 0.5, masked),
                               ("mix", 0.25, 0.75 * clean + 0.25 * masked)):
        with ActivationLoader(cache, 0, stream=stream, mix_fraction=frac) as loader:
            assert loader.norm_scale == pytest.approx(math.sqrt(D) / mean, rel=1e-12)


def test_bad_arguments_raise_clear_errors(cache):
    cases = [(dict(layer=1), r"layer 1 is not in the cache .* holds layers \[0, 2\]"),
             (dict(stream="dirty"), "unknown stream 'dirty': expected one of clean, masked, mix"),
             (dict(stream="mix", mix_fraction=1.5), r"mix fraction must be in \[0, 1\], got 1.5"),
             (dict(holdout_chunks=8), r"holdout chunks must be in \[0, 8\) .* got 8"),
             (dict(batch_size=0), "batch size must be at least 1, got 0"),
             (dict(start_step=-1), "start step must be at least 0, got -1")]
    for kw, message in cases:
        with pytest.raises(PipelineError, match=message):
            ActivationLoader(cache, **{"layer": 0, **kw})


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_a_truncated_chunk_file_is_named_in_the_error(tmp_path, codec, path):
    root = tmp_path / "trunc"
    write_synthetic_cache(root, n_chunks=2, rows_per_chunk=R, d_model=D, context_length=CTX,
                          codec=codec)
    bad = chunk_file(root, activation_array("clean", hook_name(0)), 2, 1)
    bad.write_bytes(bad.read_bytes()[:-10])
    with ActivationLoader(root, 0, batch_size=VALID, window_chunks=1) as loader:
        with pytest.raises(PipelineError, match=rf"chunk 1 of clean/{hook_name(0)} \(.*\).*"
                                                r"truncated or corrupt; run `pipeline verify`"):
            for _ in range(4):
                next(loader)
        with pytest.raises(PipelineError, match="chunk 1"):  # and again on the next call
            next(loader)


def test_an_incomplete_cache_is_refused(tmp_path):
    root = tmp_path / "incomplete"
    m = write_synthetic_cache(root, n_chunks=2, rows_per_chunk=R, d_model=D, context_length=CTX)
    m.status = "writing"
    write_manifest(root, m)
    with pytest.raises(CacheError, match="is not complete"):
        ActivationLoader(root, 0)


def test_pinning_is_requested_only_when_cuda_is_usable(cache, monkeypatch):
    should_pin = loader_module.should_pin
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not should_pin(torch.device("cuda"), None) and not should_pin(torch.device("cpu"), None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert should_pin(torch.device("cuda"), None) and not should_pin(torch.device("cpu"), None)
    assert should_pin(torch.device("cpu"), True) and not should_pin(torch.device("cuda"), False)
    monkeypatch.undo()

    calls = []
    real = torch.empty

    def spy(*args, pin_memory=False, **kw):
        calls.append(pin_memory)
        return real(*args, **kw)
    monkeypatch.setattr(background.torch, "empty", spy)
    with ActivationLoader(cache, 0, batch_size=32) as loader:
        assert not loader.pin
    assert calls and not any(calls)
    calls.clear()
    with ActivationLoader(cache, 0, batch_size=32, pin=True) as loader:
        assert loader.pin
    assert calls.count(True) == background.STAGING_SLOTS


def loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("loader-")]


def wait_until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.02)
    return cond()


def test_threads_stop_on_close_and_on_garbage_collection(cache):
    assert wait_until(lambda: not loader_threads())
    loader = ActivationLoader(cache, 0, batch_size=64)
    next(loader)
    assert loader_threads()
    loader.close()
    assert not loader_threads()
    with pytest.raises(PipelineError, match="stopped"):
        next(loader)
    loader = ActivationLoader(cache, 0, batch_size=64, n_threads=2)
    next(loader)
    del loader
    gc.collect()
    assert wait_until(lambda: not loader_threads())


def test_the_interpreter_exits_with_a_loader_left_open(cache):
    code = ("import sys; from pipeline.data import ActivationLoader; "
            f"l = ActivationLoader({str(cache)!r}, 0, batch_size=64); next(l); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches(cache):
    with ActivationLoader(cache, 0, batch_size=64, device="cuda", holdout_chunks=1) as gpu, \
            ActivationLoader(cache, 0, batch_size=64, holdout_chunks=1) as cpu:
        assert gpu.pin
        for _ in range(40):
            x = next(gpu)
            assert x.device.type == "cuda" and x.dtype == torch.float32
            assert torch.equal(x.cpu(), next(cpu))
        for x, y in zip(gpu.holdout(), cpu.holdout(), strict=True):
            assert x.device.type == "cuda" and torch.equal(x.cpu(), y)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_split_gather_writes_the_rows_in_order(parts):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.background import gather

    rng = np.random.default_rng(0)
    src = rng.standard_normal((1000, 7)).astype(np.float32)
    rows = rng.permutation(1000)[:301]
    out = torch.full((301, 7), float("nan"))
    with ThreadPoolExecutor(2) as pool:
        gather(src, rows, out, pool, parts)
    np.testing.assert_array_equal(out.numpy(), src[rows])


def test_read_threads_default_to_one_per_core_up_to_four(monkeypatch):
    from pipeline.data import loader

    for cores, expected in ((1, 1), (2, 2), (16, 4)):
        monkeypatch.setattr(loader.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert loader.default_read_threads() == expected
