"""A run folder written before the run folder had its own contract (issue 16) is still read:
tests/fixtures/run_before_issue16 was written by `pipeline train` and `pipeline eval` of that time
(on the synthetic cache rebuilt below; training.png left out), and audit, eval and --resume read it
through the command line as they did then."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cache_schema.synthetic import write_synthetic_cache
from pipeline.cli import app

FIXTURE = Path(__file__).parent / "fixtures" / "run_before_issue16"
SETTINGS = ["--layer", "1", "--arch", "relu", "--expansion", "2", "--batch-size", "64",
            "--steps", "40", "--log-every", "10", "--checkpoint-every", "20",
            "--holdout-chunks", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The cache the fixture was trained on, written again (the synthetic cache is seeded)."""
    root = tmp_path_factory.mktemp("before16") / "cache"
    m = write_synthetic_cache(root, n_chunks=4, rows_per_chunk=256, d_model=16, layers=(1,),
                              context_length=32, index_column=False)
    trained_on = json.loads((FIXTURE / "train_config.json").read_text())["cache_id"]
    assert m.cache_id == trained_on, "the synthetic cache changed: the fixture must be rewritten"
    return root


@pytest.fixture
def run(tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(FIXTURE, copy)
    return copy


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_audit_reads_an_old_run_and_finds_every_file_intact(run):
    result = invoke("audit", str(run))
    assert result.exit_code == 0, result.output
    report = json.loads((run / "audit.json").read_text())
    assert report["arch"] == "relu" and report["steps"] == 40
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["checkpoint_integrity"]["status"] == "pass"
    # eval.json of the old run is what the dead-latent check reads
    assert "held-out" in checks["dead_latents"]["detail"]


def test_eval_reads_an_old_run_and_gets_its_numbers_again(run, cache):
    before = json.loads((run / "eval.json").read_text())
    result = invoke("eval", str(run), "--cache", str(cache), "--ce-sequences", "0",
                    "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    after = json.loads((run / "eval.json").read_text())
    assert after["hook"] == before["hook"] == "blocks.1.hook_resid_post"
    assert after["holdout_chunks"] == before["holdout_chunks"] == [3]
    for key in ("mse", "fve", "l0", "dead_fraction"):
        assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-7), key


def test_an_old_run_resumes_from_its_checkpoint_and_ends_where_it_ended(run, cache):
    shutil.rmtree(run / "checkpoints" / "step_00000040")  # resume from step 20
    old_weights = load_file(str(FIXTURE / "sae_weights.safetensors"))
    old_rows = (FIXTURE / "metrics.jsonl").read_text().splitlines()
    result = invoke("train", "--cache", str(cache), "-o", str(run), *SETTINGS, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "step 20" in result.output
    weights = load_file(str(run / "sae_weights.safetensors"))
    assert weights.keys() == old_weights.keys()
    # the old folder folded the input scaling into W_enc and W_dec, ours into the biases (SPEC §6)
    scale = json.loads((run / "cfg.json").read_text())["metadata"]["norm_scale"]
    as_old = {"W_enc": weights["W_enc"] * scale, "W_dec": weights["W_dec"] / scale,
              "b_enc": weights["b_enc"] * scale, "b_dec": weights["b_dec"]}
    for name, old in old_weights.items():
        assert torch.allclose(as_old[name], old, atol=1e-5), name
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [10, 20, 30, 40]
    assert rows[:2] == old_rows[:2]  # the lines before the checkpoint are kept as they were
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000020",
                                                                       "step_00000040"]
