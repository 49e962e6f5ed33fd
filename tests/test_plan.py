"""`pipeline plan` and extract's pre-flight disk check: the numbers against arithmetic written
out here from the published shapes, and a refusal before any side effect."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.plan import estimate

runner = CliRunner()


def llama3_8b_params(kept_layers: int) -> int:
    """Embeddings + kept blocks (no LM head, no final norm counted twice): Llama-3-8B's shapes."""
    d, ff, kv, vocab = 4096, 14336, 1024, 128256
    block = d * d * 2 + d * kv * 2 + 3 * d * ff + 2 * d  # q, o; k, v; gate, up, down; 2 norms
    return vocab * d + kept_layers * block + d  # + the final norm


def plan_json(*args: str) -> dict:
    r = runner.invoke(app, ["plan", "--json", "--tflops", "100", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_llama3_8b_plan_matches_the_arithmetic():
    p = plan_json("--model", "llama-3-8b", "--layer", "16", "--tokens", "1e9", "--dtype",
                  "bfloat16", "--rows-per-chunk", "4096", "--context-length", "1024",
                  "--d-sae", "131072", "--train-batch-size", "4096")
    e, t = p["extract"], p["train"]
    tokens = 10**9 // 4096 * 4096
    assert e["tokens_per_stream"] == tokens
    per_token = 2 * 4096 * 2 + (4 + 4 + 1 + 4)  # two bf16 streams + tokens, masked, is_masked, seq
    assert e["bytes_per_token"] == per_token and e["disk_bytes"] == tokens * per_token
    assert e["model_params"] == llama3_8b_params(17)
    assert e["weights_bytes"] == 2 * e["model_params"]  # bfloat16 on the GPU
    non_embedding = e["model_params"] - 128256 * 4096
    flops = (2 * non_embedding + 2 * 17 * 1024 * 4096) * 2 * tokens
    assert e["flops"] == pytest.approx(flops)
    assert e["seconds"] == pytest.approx(flops / 100e12)
    sae = 4096 * 131072 * 2 + 131072 + 4096  # W_enc, W_dec, b_enc, b_dec
    assert t["params_bytes"] == 4 * sae and t["optimizer_bytes"] == 8 * sae
    assert t["steps"] == tokens // 4096


def test_float32_storage_doubles_the_activation_bytes():
    bf = plan_json("--model", "llama-3-8b", "--layer", "16", "--dtype", "bfloat16")
    f32 = plan_json("--model", "llama-3-8b", "--layer", "16", "--dtype", "float32")
    assert f32["extract"]["bytes_per_token"] - 13 == 2 * (bf["extract"]["bytes_per_token"] - 13)


def test_the_plan_reads_an_hf_folder_config(tiny_model):
    p = plan_json("--model", str(tiny_model), "--layer", "1", "--tokens", "4096")
    assert p["d_model"] == 64 and p["n_layers"] == 4
    assert p["extract"]["disk_bytes"] == 4096 * (2 * 64 * 4 + 13)


def test_the_text_report_names_the_numbers():
    r = runner.invoke(app, ["plan", "--model", "llama-3-8b", "--layer", "16", "--tokens", "1e9",
                            "--tflops", "400"])
    assert r.exit_code == 0, r.output
    for needle in ("29.8 TiB", "32.0 KiB per token", "4.23 B parameters", "TFLOP/s (given)",
                   "Adam"):
        assert needle in r.output, r.output


Usage = namedtuple("Usage", "total used free")


def test_extract_refuses_before_writing_when_the_disk_is_too_small(tmp_path, monkeypatch,
                                                                      tiny_model, corpus):
    monkeypatch.setattr(estimate.shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 1000))
    out = tmp_path / "cache"
    args = ["extract", "--out", str(out), "--model", str(tiny_model), "--corpus", str(corpus),
            "--layer", "1", "--tokens", "1024", "--rows-per-chunk", "512",
            "--context-length", "64", "--no-progress"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    needed = 1024 * (2 * 64 * 4 + 13)
    assert f"needs {estimate.human(needed)}" in r.output and "1000 B free" in r.output
    assert "--force" in r.output and not out.exists()
    r = runner.invoke(app, [*args, "--force"])
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and (out / "zarr.json").is_file()


def test_a_resume_needs_only_the_missing_chunks(tmp_path, monkeypatch, tiny_model, corpus):
    out = tmp_path / "cache"
    args = ["extract", "--out", str(out), "--model", str(tiny_model), "--corpus", str(corpus),
            "--layer", "1", "--tokens", "1024", "--rows-per-chunk", "512",
            "--context-length", "64", "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    (out / "_chunks" / "00000001.json").unlink()  # as if killed before chunk 1's record
    chunk = 512 * (2 * 64 * 4 + 13)
    monkeypatch.setattr(estimate.shutil, "disk_usage", lambda path: Usage(0, 0, chunk + 1))
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("count,value", [("16384", 16384), ("1e9", 10**9), ("2.5e6", 2500000),
                                         ("100M", 10**8), ("4k", 4000)])
def test_counts_take_scientific_notation_and_suffixes(count, value):
    from pipeline.options import parse_count

    assert parse_count(count) == value


def test_overwriting_another_cache_counts_its_bytes_not_its_chunks(tmp_path, monkeypatch,
                                                                   tiny_model, corpus):
    """Under --overwrite the old cache's chunks are not this cache's work done: its bytes are
    what gets freed (here half a chunk: one bfloat16 chunk where four float32 ones are due)."""
    out = tmp_path / "cache"
    args = ["extract", "--out", str(out), "--model", str(tiny_model), "--corpus", str(corpus),
            "--layer", "1", "--rows-per-chunk", "512", "--context-length", "64", "--no-progress"]
    assert runner.invoke(app, [*args, "--tokens", "512", "--dtype", "bfloat16"]).exit_code == 0
    chunk = 512 * (2 * 64 * 4 + 13)
    monkeypatch.setattr(estimate.shutil, "disk_usage",
                        lambda path: Usage(0, 0, int(3.2 * chunk)))
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    r = runner.invoke(app, [*args, "--tokens", "2048", "--overwrite"])
    assert r.exit_code == 2, r.output
    assert "4 chunks" in r.output and "--force" in r.output, r.output
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
