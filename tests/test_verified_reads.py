"""Readers check each chunk file against its chunk record before its rows are used: a flipped
byte stops `train` with a clear error and is never trained on; a file truncated while training
runs is a clear error, not SIGBUS."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_schema import TOKENS, activation_array, chunk_file, hook_name, verify
from cache_schema.synthetic import write_synthetic_cache
from pipeline.cli import app
from pipeline.data import ActivationLoader
from pipeline.errors import PipelineError

R, CTX, D, K = 256, 32, 16, 4
REPO = Path(__file__).resolve().parents[1]


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def make(root: Path, **kw) -> Path:
    write_synthetic_cache(root, **{"n_chunks": K, "rows_per_chunk": R, "d_model": D,
                                   "context_length": CTX, **kw})
    return root


def clean_file(root: Path, k: int) -> Path:
    return chunk_file(root, activation_array("clean", hook_name(0)), 2, k)


def test_train_refuses_a_chunk_with_a_flipped_byte(tmp_path):
    root = make(tmp_path / "cache", index_column=False)
    bad = clean_file(root, 2)
    flip_byte(bad)
    assert any("chunk 2" in p for p in verify(root)[1])
    r = CliRunner().invoke(app, ["train", "--cache", str(root), "-o", str(tmp_path / "run"),
                                 "--steps", "40", "--batch-size", "64", "--no-progress",
                                 "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and "Traceback" not in r.output
    for needle in (f"chunk 2 of clean/{hook_name(0)}", str(bad), "XXH3-64", "pipeline verify"):
        assert needle in " ".join(r.output.split()), r.output
    assert not (tmp_path / "run" / "sae_weights.safetensors").exists()


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_no_row_of_a_corrupt_chunk_reaches_a_batch(tmp_path, codec, mapped):
    root = make(tmp_path / "cache", codec=codec)
    bad = clean_file(root, 1)
    flip_byte(bad, at=os.path.getsize(bad) - 3)  # a value, not the frame header
    seen = []
    with ActivationLoader(root, 0, batch_size=32, window_chunks=1, seed=1, mapped=mapped
                          ) as loader, \
            pytest.raises(PipelineError, match=r"chunk 1 of clean/.*XXH3-64.*pipeline verify"):
        for _ in range(4 * K * R // 32):
            seen.append(next(loader)[:, 0].clone())
    rows = torch.cat(seen).long() if seen else torch.empty(0)
    assert not ((rows >= R) & (rows < 2 * R)).any()  # column 0 is the global row index


def test_a_flipped_token_file_is_caught_too(tmp_path):
    root = make(tmp_path / "cache")
    flip_byte(chunk_file(root, TOKENS, 1, 3), at=8)
    with ActivationLoader(root, 0, batch_size=32, window_chunks=K) as loader, \
            pytest.raises(PipelineError, match=r"chunk 3 of tokens .*XXH3-64"):
        next(loader)


def test_holdout_chunks_are_checked(tmp_path):
    root = make(tmp_path / "cache")
    flip_byte(clean_file(root, K - 1))
    with ActivationLoader(root, 0, batch_size=32, holdout_chunks=1) as loader:
        next(loader)
        with pytest.raises(PipelineError, match=rf"chunk {K - 1} of clean/.*XXH3-64"):
            list(loader.holdout())


def test_each_file_is_hashed_on_its_first_read_only(tmp_path, monkeypatch):
    from pipeline.data import reader

    root = make(tmp_path / "cache")
    calls, real = [], reader.read_chunk_file

    def counted(path, k, array, **kw):
        if kw.get("digests") is not None:
            calls.append((array, k))
        return real(path, k, array, **kw)

    monkeypatch.setattr(reader, "read_chunk_file", counted)
    with ActivationLoader(root, 0, batch_size=64, window_chunks=2) as loader:
        for _ in range(3 * K * R // 64):  # about three epochs
            next(loader)
    assert sorted(calls) == sorted((a, k) for a in (TOKENS, activation_array("clean", hook_name(0)))
                                   for k in range(K))  # each file once


def test_a_cache_without_xxh3_records_is_checked_by_sha256(tmp_path):
    """Caches written before chunk records held XXH3-64 are still checked, by their SHA-256."""
    from cache_schema import read_chunk_record, write_chunk_record

    root = make(tmp_path / "cache")
    for k in range(K):
        record = read_chunk_record(root, k)
        del record["xxh3"]
        write_chunk_record(root, k, record)
    flip_byte(clean_file(root, 1))
    with ActivationLoader(root, 0, batch_size=32, window_chunks=K) as loader, \
            pytest.raises(PipelineError, match=r"chunk 1 of clean/.*SHA-256.*pipeline verify"):
        for _ in range(K * R // 32):
            next(loader)


def test_verify_checks_the_xxh3_record_too(tmp_path):
    """A record whose XXH3-64 disagrees with the file (the loader's check) fails `verify` even
    where its SHA-256 matches."""
    from cache_schema import read_chunk_record, write_chunk_record

    root = make(tmp_path / "cache")
    record = read_chunk_record(root, 2)
    name = activation_array("clean", hook_name(0))
    record["xxh3"][name] = "0" * 16
    write_chunk_record(root, 2, record)
    assert any("chunk 2" in p and "XXH3-64" in p for p in verify(root)[1])


def test_a_record_without_checksums_is_a_clear_error(tmp_path):
    from cache_schema import read_chunk_record, write_chunk_record

    root = make(tmp_path / "cache")
    record = read_chunk_record(root, 0)
    record["checksums"] = record["xxh3"] = "gone"
    write_chunk_record(root, 0, record)
    with ActivationLoader(root, 0, batch_size=32, window_chunks=K) as loader, \
            pytest.raises(PipelineError, match="record of chunk 0 has no checksum for"):
        next(loader)


def test_verify_and_the_loader_agree_on_a_good_cache(tmp_path):
    root = make(tmp_path / "cache", storage_dtype="bfloat16", codec="blosc-lz4")
    assert verify(root)[1] == []
    with ActivationLoader(root, 0, batch_size=64) as loader:
        assert torch.isfinite(next(loader)).all()


TRUNCATE_MID_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from cache_schema import activation_array, chunk_file, hook_name
    from pipeline.data import ActivationLoader
    from pipeline.errors import PipelineError
    root = Path(sys.argv[1])
    loader = ActivationLoader(root, 0, batch_size=16, window_chunks={K}, seed=2)
    next(loader)
    for k in range({K}):  # every chunk file of the stream, while its window is in use
        f = chunk_file(root, activation_array("clean", hook_name(0)), 2, k)
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    try:
        for _ in range(3 * {K} * {R} // 16):
            next(loader)
    except PipelineError as e:
        print(e)
        sys.exit(3)
    sys.exit(0)
""").format(K=K, R=R)


def test_a_chunk_truncated_while_training_runs_is_a_clear_error_not_sigbus(tmp_path):
    root = make(tmp_path / "cache")  # 16 KiB chunks: whole pages, so the old loader mapped them
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", TRUNCATE_MID_RUN, str(root)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert "bytes where" in r.stdout and "pipeline verify" in r.stdout
    assert np.fromfile(clean_file(root, 0), np.float32).size == R * D // 2
