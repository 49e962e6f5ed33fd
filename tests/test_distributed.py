"""Launched training (torchrun, gloo on CPU, 2 processes): a sweep's points dealt to the processes
give the same folders and byte-identical SAEs as one process; it resumes with any process count;
processes that disagree stop at start-up."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cache_schema.synthetic import write_synthetic_cache
from pipeline.train.config import TrainConfig
from pipeline.train.sweep import sweep
from tests.test_multiprocess import ENV, command

ENV = {**ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
GRID = ["--set", "arch=relu,topk,masked,gated,batchtopk"]  # 5 points on 2 processes


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist") / "cache"
    write_synthetic_cache(root, n_chunks=4, rows_per_chunk=256, d_model=16, context_length=32,
                          index_column=False)
    return root


def sweep_args(cache, out, *extra) -> list[str]:
    return ["sweep", "--cache", str(cache), "-o", str(out), *GRID, "--steps", "40",
            "--batch-size", "64", "--expansion", "2", "--k", "4", "--log-every", "10",
            "--checkpoint-every", "20", "--device", "cpu", "--no-progress", *extra]


def launch(n: int, args: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command(n, args), env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def weights(root: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(root.glob("*/sae_weights.safetensors"))}


def names(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.slow
def test_a_two_process_sweep_equals_one_process_byte_for_byte(cache, tmp_path):
    one = launch(1, sweep_args(cache, tmp_path / "one"))
    two = launch(2, sweep_args(cache, tmp_path / "two"))
    assert len(weights(tmp_path / "one")) == 5
    assert weights(tmp_path / "two") == weights(tmp_path / "one")
    assert names(tmp_path / "two") == names(tmp_path / "one")
    def moved(text: str) -> str:
        return text.replace(str(tmp_path / "one"), str(tmp_path / "two"))
    for run in (tmp_path / "one").glob("*/"):  # the same settings and SAELens config files
        for name in ("train_config.json", "cfg.json"):
            assert (tmp_path / "two" / run.name / name).read_text() == moved(
                (run / name).read_text()), name
    assert (tmp_path / "two" / "sweep.json").read_text() == moved(
        (tmp_path / "one" / "sweep.json").read_text())
    # rank 0 prints every point's summary, once
    printed = json.loads(two.stdout[two.stdout.index("["):])
    assert [r["run"] for r in printed] == [moved(r["run"]) for r in
                                           json.loads(one.stdout[one.stdout.index("["):])]


@pytest.mark.slow
def test_a_sweep_cut_in_one_process_resumes_in_two(cache, tmp_path, monkeypatch):
    from pipeline.train.step import TrainStep

    launch(1, sweep_args(cache, tmp_path / "ref"))
    original, calls = TrainStep.run, {"n": 0}

    def crash(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == 5 * 27:  # every SAE past step 20's checkpoint
            raise KeyboardInterrupt
    monkeypatch.setattr(TrainStep, "run", crash)
    cfg = TrainConfig.from_flat(cache=str(cache), out=str(tmp_path / "cut"), steps=40,
                                batch_size=64, expansion=2, k=4, log_every=10,
                                checkpoint_every=20, device="cpu", progress=False)
    with pytest.raises(KeyboardInterrupt):
        sweep(cfg, sets=[GRID[1]])
    assert not weights(tmp_path / "cut")
    launch(2, sweep_args(cache, tmp_path / "cut", "--resume"))
    assert weights(tmp_path / "cut") == weights(tmp_path / "ref")


@pytest.mark.slow
def test_processes_that_disagree_on_the_sweep_stop_before_writing(cache, tmp_path):
    # rank 1 is given another learning rate: both exit 2 naming it, and nothing is written
    script = ("import os, sys; from pipeline.cli import app; extra = ['--lr', '0.001'] "
              "if os.environ['RANK'] == '1' else []; sys.argv[1:] += extra; app()")
    args = command(2, sweep_args(cache, tmp_path / "s"))
    at = args.index("-m", args.index("--master_port"))
    launcher = [*args[:at], "--no-python", "python", "-c", script, *args[at + 2:]]
    done = subprocess.run(launcher, env=ENV, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode != 0
    assert "disagree on the sweep: lr is 0.001 here but 0.0002 on process 0" in done.stderr
    assert "exitcode  : 2" in done.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_a_process_that_does_not_answer_stops_the_others_within_the_timeout(cache, tmp_path):
    import time

    # rank 1 stalls after joining: rank 0's first collective times out, exits 2 and says why
    script = ("import os, time; from pipeline import processes; from pipeline.cli import app\n"
              "if os.environ['RANK'] == '1':\n"
              "    slow = processes.Workers.together\n"
              "    processes.Workers.together = lambda self, fn: (time.sleep(120), "
              "slow(self, fn))[1]\n"
              "app()")
    args = command(2, sweep_args(cache, tmp_path / "s"))
    at = args.index("-m", args.index("--master_port"))
    launcher = [*args[:at], "--no-python", "python", "-c", script, *args[at + 2:]]
    start = time.time()
    done = subprocess.run(launcher, env={**ENV, "PIPELINE_PEER_TIMEOUT": "5"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert time.time() - start < 90
    # rank 0 names the process it waited for, read from that process's heartbeat
    assert "process 0 of 2 got no answer from process 1 within 5 s (PIPELINE_PEER_TIMEOUT)" \
        in done.stderr, done.stderr[-4000:]
    assert "exitcode  : 2" in done.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_accelerate_launch_deals_a_sweep_like_torchrun(cache, tmp_path):
    import sys

    from tests.test_multiprocess import free_port

    pytest.importorskip("accelerate")
    # --multi_gpu is accelerate's torchrun path (without GPUs too: --device cpu picks gloo);
    # its --cpu mode launches through mpirun instead
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                  "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                  "-m", "pipeline.cli"]
    args = sweep_args(cache, tmp_path / "acc")
    done = subprocess.run([*accelerate, *args], env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    launch(1, sweep_args(cache, tmp_path / "one"))
    assert weights(tmp_path / "acc") == weights(tmp_path / "one")
    assert done.stdout.count('"run"') == 5
