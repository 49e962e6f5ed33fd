"""`pipeline verify` checks more than checksums: chunk file sizes against the array metadata, each
array's zarr.json against the manifest, and the norm statistics recomputed from the data against
the chunk records and the manifest. Each problem is named; exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cache_schema import (
    activation_array,
    chunk_file,
    hook_name,
    read_chunk_record,
    read_manifest,
    records_digest,
    write_chunk_record,
    write_manifest,
)
from cache_schema.files import file_digests
from cache_schema.synthetic import write_synthetic_cache
from pipeline.cli import app

R, D, K = 256, 16, 4
HOOK = hook_name(0)


def make(root: Path, **kw) -> Path:
    write_synthetic_cache(root, **{"n_chunks": K, "rows_per_chunk": R, "d_model": D,
                                   "context_length": 32, **kw})
    return root


def verify_cli(root: Path):
    return CliRunner().invoke(app, ["verify", str(root)])


def assert_problems(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def reseal(root: Path) -> None:
    """Make the records digest match again after a record was edited (chunks_digest is not part
    of the cache id), so that only the deeper check can catch the edit."""
    m = read_manifest(root)
    m.chunks_digest = records_digest(root, m)
    write_manifest(root, m)


@pytest.mark.parametrize(("dtype", "codec"), [("float32", "none"), ("bfloat16", "blosc-lz4"),
                                              ("float16", "zstd")])
def test_a_good_cache_passes(tmp_path, dtype, codec):
    r = verify_cli(make(tmp_path / "c", storage_dtype=dtype, codec=codec))
    assert r.exit_code == 0, r.output


def test_a_chunk_of_the_wrong_size_is_named_even_when_its_record_agrees(tmp_path):
    root = make(tmp_path / "c")
    name = activation_array("masked", HOOK)
    f = chunk_file(root, name, 2, 1)
    f.write_bytes(f.read_bytes()[: -4 * D])  # one row short
    record = read_chunk_record(root, 1)
    record["checksums"][name], record["xxh3"][name] = file_digests(f, ("sha256", "xxh3")).values()
    write_chunk_record(root, 1, record)
    reseal(root)
    assert_problems(verify_cli(root), f"chunk 1: {name} has {(R - 1) * D * 4} bytes where "
                                      f"{R * D * 4} were expected")


def test_an_array_metadata_that_disagrees_with_the_manifest_is_named(tmp_path):
    root = make(tmp_path / "c")
    meta_path = root / activation_array("clean", HOOK) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [R // 2, D]
    meta["data_type"] = "float16"
    meta_path.write_text(json.dumps(meta))
    assert_problems(verify_cli(root), f"clean/{HOOK}: {meta_path} has chunk_shape [{R // 2}, {D}]"
                                      f" where the manifest implies [{R}, {D}]",
                    "data_type float16 where the manifest implies float32")


def test_recorded_norm_stats_are_recomputed_from_the_data(tmp_path):
    root = make(tmp_path / "c")
    record = read_chunk_record(root, 2)
    record["stats"][HOOK]["masked"]["sum"] *= 1.1
    write_chunk_record(root, 2, record)
    reseal(root)
    assert_problems(verify_cli(root), f"chunk 2: recorded norm stats {HOOK} masked sum is",
                    "where the data give", f"manifest norm_stats {HOOK} masked mean_norm")


def test_manifest_norm_stats_are_checked_against_the_records(tmp_path):
    root = make(tmp_path / "c")
    m = read_manifest(root)
    m.norm_stats[HOOK]["clean"]["mean_norm"] *= 2
    write_manifest(root, m)
    assert_problems(verify_cli(root), f"manifest norm_stats {HOOK} clean mean_norm is",
                    "where the records give")


def test_a_compressed_chunk_that_does_not_decode_is_named(tmp_path):
    root = make(tmp_path / "c", codec="zstd")
    name = activation_array("clean", HOOK)
    f = chunk_file(root, name, 2, 3)
    f.write_bytes(b"not a zstd frame")
    record = read_chunk_record(root, 3)
    record["checksums"][name], record["xxh3"][name] = file_digests(f, ("sha256", "xxh3")).values()
    write_chunk_record(root, 3, record)
    reseal(root)
    assert_problems(verify_cli(root), f"chunk 3: {name} cannot be decoded")


def test_malformed_records_and_metadata_are_problems_not_tracebacks(tmp_path):
    root = make(tmp_path / "c")
    record = read_chunk_record(root, 0)
    record["stats"] = "garbage"
    write_chunk_record(root, 0, record)
    (root / "seq" / "zarr.json").write_text('{"chunk_grid": 3, "codecs": "x"}')
    reseal(root)
    r = verify_cli(root)
    assert_problems(r, "chunk 0: recorded norm stats", "seq: ")
