"""A run knows its cache wherever it is read from: train_config.json holds the absolute cache path,
the cache id and the model fingerprint; eval and features refuse a cache of another model and warn
on another cache of the same one; --resume matches folders, not the text typed; non-finite eval
metrics are written as JSON null with a warning; a huge --latents range is refused unbuilt."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cache_schema.synthetic import write_synthetic_cache
from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.features.run import parse_latents
from pipeline.run import save_saelens
from pipeline.sae import build_sae, sae_config
from pipeline.train.config import TrainConfig
from pipeline.train.trainer import train

D = 16


def synthetic(root: Path, seed: int = 0, n_chunks: int = 3) -> Path:
    write_synthetic_cache(root, n_chunks=n_chunks, rows_per_chunk=256, d_model=D, layers=(1,),
                          context_length=32, seed=seed, index_column=False)
    return root


def config(cache: str, out: str, **kw) -> TrainConfig:
    fields = {"cache": cache, "out": out, "expansion": 2, "batch_size": 64, "steps": 10,
              "log_every": 5, "checkpoint_every": 5, "holdout_chunks": 1, "device": "cpu",
              "progress": False}
    return TrainConfig.from_flat(**{**fields, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run trained from its own folder with a relative --cache, as a user types it."""
    root = tmp_path_factory.mktemp("provenance")
    synthetic(root / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        train(config("cache", "run"))
    return root / "run"


def eval_cli(*args: str):
    return CliRunner().invoke(app, ["eval", *args, "--ce-sequences", "0", "--device", "cpu",
                                    "--no-progress"])


def test_the_run_records_its_cache_as_an_absolute_path_with_id_and_fingerprint(run):
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["cache"] == str((run.parent / "cache").resolve())
    cfg = json.loads((run / "cfg.json").read_text())
    assert saved["cache_id"] == cfg["metadata"]["cache_id"]
    assert saved["model_fingerprint"] == "synthetic-0"


def test_eval_from_another_folder_reads_the_runs_cache(run, tmp_path, monkeypatch):
    copy = shutil.copytree(run, tmp_path / "run")
    (tmp_path / "cache").mkdir()  # a decoy where the relative path would land
    monkeypatch.chdir(tmp_path)
    result = eval_cli(str(copy))
    assert result.exit_code == 0, result.output
    assert json.loads((copy / "eval.json").read_text())["cache_id"] == \
        json.loads((run / "train_config.json").read_text())["cache_id"]


def test_eval_refuses_the_runs_cache_replaced_by_another_models(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    saved = json.loads((copy / "train_config.json").read_text())
    saved["cache"] = str(synthetic(tmp_path / "other", seed=1))
    (copy / "train_config.json").write_text(json.dumps(saved))
    result = eval_cli(str(copy))
    assert result.exit_code == 2 and "another model" in result.stderr, result.output
    assert not (copy / "eval.json").exists()


def test_eval_warns_naming_both_ids_when_only_the_cache_id_differs(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    again = synthetic(tmp_path / "again", seed=0, n_chunks=4)  # same model, other data
    result = eval_cli(str(copy), "--cache", str(again))
    assert result.exit_code == 0, result.output
    trained_on = json.loads((run / "train_config.json").read_text())["cache_id"]
    now = json.loads((copy / "eval.json").read_text())["cache_id"]
    assert trained_on != now
    assert "warning" in result.stderr and trained_on in result.stderr and now in result.stderr


def test_a_run_folder_from_before_the_cache_id_still_evaluates(run, tmp_path, monkeypatch):
    copy = shutil.copytree(run, tmp_path / "run")
    saved = json.loads((copy / "train_config.json").read_text())
    for key in ("cache_id", "model_fingerprint"):
        saved.pop(key, None)
    saved["cache"] = "cache"  # relative, as runs stored it before
    (copy / "train_config.json").write_text(json.dumps(saved))
    monkeypatch.chdir(run.parent)
    result = eval_cli(str(copy))
    assert result.exit_code == 0, result.output
    assert "warning: " + str(copy) + " was trained on cache" not in result.stderr


def test_resume_accepts_another_spelling_of_the_same_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synthetic(tmp_path / "cache", n_chunks=2)
    train(config("cache", "run", steps=10, holdout_chunks=0))
    train(config("./cache", "./run", steps=10, holdout_chunks=0, resume=True))  # ./x is x
    shutil.move("run", "moved")
    shutil.move("cache", "cache2")
    summary = train(config("cache2", "moved", steps=10, holdout_chunks=0, resume=True))
    assert summary["steps"] == 10
    with pytest.raises(PipelineError, match=r"settings differ.*cache"):
        train(config(str(synthetic(tmp_path / "c3", seed=3, n_chunks=2)), "moved", steps=10,
                     holdout_chunks=0, resume=True))


def test_non_finite_eval_metrics_are_null_with_a_warning(tmp_path):
    cache = synthetic(tmp_path / "cache")
    sae = build_sae(sae_config(arch="relu", d_in=D, d_sae=2 * D))
    with torch.no_grad():
        sae.W_dec.fill_(float("nan"))
    folder = tmp_path / "sae"
    save_saelens(folder, sae, 1.0, {"hook_name": "blocks.1.hook_resid_post",
                                    "model_name": "synthetic"})
    result = eval_cli(str(folder), "--cache", str(cache), "--holdout-chunks", "1")
    assert result.exit_code == 0, result.output
    assert "non-finite" in result.stderr and "mse" in result.stderr and "fve" in result.stderr

    def no_constants(name):
        raise AssertionError(f"{name} in eval.json")

    saved = json.loads((folder / "eval.json").read_text(), parse_constant=no_constants)
    assert saved["mse"] is None and saved["fve"] is None
    json.loads(result.stdout, parse_constant=no_constants)


def test_a_huge_latent_range_is_refused_without_building_it():
    tracemalloc.start()
    try:
        with pytest.raises(PipelineError, match="latent 2000000 is out of range"):
            parse_latents("0-2000000", 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
