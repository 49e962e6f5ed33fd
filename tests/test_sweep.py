"""pipeline sweep: one read of the cache feeds K SAEs; each equals its solo run; resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.train.config import TrainConfig
from pipeline.train.sweep import read_grid, sweep
from pipeline.train.trainer import train
from tests.test_distributed import cache  # noqa: F401 - the 4-chunk cache fixture


def base(cache, out, **kw) -> TrainConfig:  # noqa: F811
    fields = {"cache": str(cache), "out": str(out), "expansion": 2, "batch_size": 64,
              "steps": 40, "log_every": 10, "checkpoint_every": 20, "device": "cpu",
              "progress": False}
    return TrainConfig.from_flat(**{**fields, **kw})


def test_each_sae_of_a_sweep_equals_its_solo_run(cache, tmp_path):  # noqa: F811
    runs = sweep(base(cache, tmp_path / "sweep"), sets=["arch=relu,topk", "stream=clean,masked"])
    assert len(runs) == 4
    listing = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert listing["runs"] == [r["run"] for r in runs]
    for summary in runs:
        run = Path(summary["run"])
        cfg = json.loads((run / "train_config.json").read_text())
        solo = tmp_path / f"solo-{run.name}"
        train(base(cache, solo, arch=cfg["arch"], stream=cfg["stream"]))
        got = (run / "sae_weights.safetensors").read_bytes()
        assert got == (solo / "sae_weights.safetensors").read_bytes(), run.name


def test_a_sweep_resumes_as_a_whole(cache, tmp_path, monkeypatch):  # noqa: F811
    from pipeline.train.step import TrainStep

    ref = sweep(base(cache, tmp_path / "ref"), sets=["l1=0.001,0.01"])
    original = TrainStep.run
    calls = {"n": 0}

    def crash(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == 2 * 27:  # both SAEs past step 20's checkpoint
            raise KeyboardInterrupt
    monkeypatch.setattr(TrainStep, "run", crash)
    with pytest.raises(KeyboardInterrupt):
        sweep(base(cache, tmp_path / "cut"), sets=["l1=0.001,0.01"])
    monkeypatch.setattr(TrainStep, "run", original)
    resumed = sweep(base(cache, tmp_path / "cut", resume=True), sets=["l1=0.001,0.01"])
    for a, b in zip(ref, resumed, strict=True):
        assert (Path(a["run"]) / "sae_weights.safetensors").read_bytes() == \
            (Path(b["run"]) / "sae_weights.safetensors").read_bytes()


def test_grid_files_and_bad_grids(tmp_path):
    toml = tmp_path / "grid.toml"
    toml.write_text('arch = "topk"\n[grid]\nk = [8, 16]\nlr = [1e-3]\n')
    overrides, grid = read_grid(str(toml), ["l1=0.5,1"])
    assert overrides == {"arch": "topk"} and grid == {"k": [8, 16], "lr": [1e-3], "l1": [0.5, 1.0]}
    with pytest.raises(PipelineError, match="share batch_size"):
        read_grid(None, ["batch_size=32,64"])
    with pytest.raises(PipelineError, match="not a training setting"):
        read_grid(None, ["nope=1"])
    with pytest.raises(PipelineError, match="expected float"):
        read_grid(None, ["l1=abc"])
    with pytest.raises(PipelineError, match="no grid"):
        read_grid(None, [])


def test_cli_sweep(cache, tmp_path):  # noqa: F811
    result = CliRunner().invoke(app, ["sweep", "--cache", str(cache), "-o", str(tmp_path / "s"),
                                      "--set", "expansion=1,2", "--steps", "10",
                                      "--batch-size", "32", "--log-every", "5",
                                      "--checkpoint-every", "5", "--device", "cpu",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("["):])
    assert [r["d_sae"] for r in out] == [16, 32]


@pytest.mark.slow
def test_three_train_processes_on_one_cache_equal_their_solo_runs(cache, tmp_path):  # noqa: F811
    import os
    import subprocess
    import sys

    from cache_schema import verify

    before = sorted((p.relative_to(cache), p.stat().st_mtime_ns) for p in cache.rglob("*"))
    args = ["--cache", str(cache), "--steps", "60", "--batch-size", "64", "--expansion", "2",
            "--log-every", "10", "--checkpoint-every", "20", "--device", "cpu", "--no-progress"]
    variants = {"relu": ["--arch", "relu"], "topk": ["--arch", "topk", "--k", "4"],
                "masked": ["--arch", "masked", "--stream", "masked"]}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", *args, *extra,
                                     "-o", str(tmp_path / f"together-{name}")],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for name, extra in variants.items()}
    for proc in procs.values():
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    for name, extra in variants.items():
        solo = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", *args, *extra,
                               "-o", str(tmp_path / f"solo-{name}")], env=env,
                              capture_output=True, check=False)
        assert solo.returncode == 0, solo.stderr.decode()
        assert (tmp_path / f"together-{name}" / "sae_weights.safetensors").read_bytes() == \
            (tmp_path / f"solo-{name}" / "sae_weights.safetensors").read_bytes(), name
    after = sorted((p.relative_to(cache), p.stat().st_mtime_ns) for p in cache.rglob("*"))
    assert before == after  # nothing written to the cache, not even a lock file
    assert verify(cache)[1] == []
