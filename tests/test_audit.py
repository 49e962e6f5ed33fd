"""pipeline audit: the article's checklist computed from a run's files, failing when it should."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from cache_schema.synthetic import write_synthetic_cache
from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.eval.audit import run_audit
from pipeline.train.config import TrainConfig
from pipeline.train.trainer import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    write_synthetic_cache(root / "cache", n_chunks=4, rows_per_chunk=256, d_model=16,
                          context_length=32, index_column=False)
    train(TrainConfig.from_flat(cache=str(root / "cache"), out=str(root / "run"), arch="masked",
                      expansion=4, batch_size=64, steps=80, log_every=10, checkpoint_every=40,
                      device="cpu", progress=False))
    return root / "run"


def copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def status(report, name):
    return next(c["status"] for c in report["checks"] if c["check"] == name)


def test_a_healthy_run_passes_and_writes_the_report(run, tmp_path):
    run = copy(run, tmp_path)
    result = CliRunner().invoke(app, ["audit", str(run)])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "audit.json").read_text())
    assert report["failed"] == []
    assert status(report, "downstream_false_positive_rate") == "skipped"
    assert status(report, "checkpoint_integrity") == "pass"
    assert "| dead_latents |" in (run / "audit.md").read_text()
    for png in report["plots"]:
        assert (run / png).stat().st_size > 5000


def test_a_tampered_weights_file_fails_integrity_naming_it(run, tmp_path):
    run = copy(run, tmp_path)
    weights = run / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["audit", str(run)])
    assert result.exit_code == 1
    assert "sae_weights.safetensors: SHA-256" in result.output
    assert "checkpoint_integrity" in result.output


def test_dead_latents_and_l1_and_rising_variance_fail(run, tmp_path):
    run = copy(run, tmp_path)
    (run / "eval.json").write_text(json.dumps({"dead_fraction": 0.2}))
    cfg = json.loads((run / "train_config.json").read_text())
    cfg["l1"] = 5e-3
    (run / "train_config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):  # noise that grows in the second half of training
        row["step_mse"] = list(1.0 + rng.normal(size=10) * (1.0 if i < 4 else 3.0))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run_audit(run)
    assert set(report["failed"]) == {"dead_latents", "l1_coefficient", "loss_variance_increase"}


def test_missing_files_give_clear_errors(run, tmp_path):
    with pytest.raises(PipelineError, match="not a run folder"):
        run_audit(tmp_path)
    run = copy(run, tmp_path)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(PipelineError, match="has no checkpoint"):
        run_audit(run)
