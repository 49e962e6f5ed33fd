"""Data-parallel `pipeline train` under torchrun (gloo on CPU, 2 processes): equal to one process
on the same global batches, batch statistics included; a killed rank is named by the survivor and
its run resumes to the same weights; batches that do not split evenly, and BatchTopK's dense
reference, are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.run import RunDir
from tests.test_distributed import ENV, cache, launch  # noqa: F401 - cache is a fixture
from tests.test_multiprocess import children, free_port

ARCHS = {"relu": ["--arch", "relu"],
         "masked": ["--arch", "masked", "--stream", "masked", "--mask-every", "5",
                    "--mask-eps", "0.69"],
         # AuxK turns on at the check of step 75 and trains the last 25 steps
         "topk": ["--arch", "topk", "--k", "2", "--aux-k", "8", "--dead-tokens", "64",
                  "--steps", "100", "--checkpoint-every", "25", "--log-every", "5"],
         "gated": ["--arch", "gated"],
         "batchtopk": ["--arch", "batchtopk", "--k", "2"]}


def train_args(cache, out, *extra, steps=60, every=20) -> list[str]:  # noqa: F811
    """Settings, with `extra` replacing any of them (a flag given twice: the last wins)."""
    base = {"--steps": str(steps), "--batch-size": "64", "--expansion": "2", "--log-every": "10",
            "--checkpoint-every": str(every), "--dead-tokens": "320", "--lr": "0.004",
            "--lr-warmup-steps": "5", "--device": "cpu"}
    flags, rest = dict(base), []
    it = iter(extra)
    for word in it:
        if word in base or (word.startswith("--") and word not in ("--resume", "--no-sparse")):
            flags[word] = next(it)
        else:
            rest.append(word)
    return ["train", "--cache", str(cache), "-o", str(out), "--no-progress", *rest,
            *[x for kv in flags.items() for x in kv]]


def last_state(run: Path) -> dict[str, torch.Tensor]:
    folder = RunDir(run)
    return {k[4:]: v for k, v in folder.checkpoint_state(folder.checkpoints()[-1]).items()
            if k.startswith("sae.")}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_two_processes_train_one_sae_as_one_process_does(cache, tmp_path, arch):  # noqa: F811
    launch(1, train_args(cache, tmp_path / "one", *ARCHS[arch]))
    two = launch(2, train_args(cache, tmp_path / "two", *ARCHS[arch]))
    assert two.stdout.count('"run"') == 1  # rank 0 alone prints the summary
    one, got = last_state(tmp_path / "one"), last_state(tmp_path / "two")
    assert one.keys() == got.keys()
    for name, value in one.items():
        if value.is_floating_point() and name != "mask":
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
        else:  # the dead-latent counters, the dormancy mask, AuxK's switch: exactly global
            assert torch.equal(got[name], value), name
    if arch == "masked":
        assert 0 < one["mask"].sum() < len(one["mask"]), "the test should mask some latents"
    rows_one = RunDir(tmp_path / "one").read_metrics()
    rows_two = RunDir(tmp_path / "two").read_metrics()
    for a, b in zip(rows_one, rows_two, strict=True):  # global metrics, written once
        for key in ("loss", "mse", "fve", "l0", "dead_fraction", "mask_density"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    if arch == "topk":  # AuxK ran: some latents were dead at the check of step 75
        assert [r["dead_fraction"] > 0 for r in rows_one if r["step"] == 75] == [True]


def two_machines(args: list[str]) -> list[subprocess.Popen]:
    """One torchrun per 'machine' of one process each: a machine's launcher stops only its own
    processes, so the survivor has to find out for itself which process was lost."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                              "--node_rank", str(r), "--nproc_per_node", "1", "--master_addr",
                              "127.0.0.1", "--master_port", port, "-m", "pipeline.cli", *args],
                             env={**ENV, "PIPELINE_PEER_TIMEOUT": "60"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for r in (0, 1)]


@pytest.mark.slow
def test_a_killed_rank_resumes_to_the_uninterrupted_weights(cache, tmp_path):  # noqa: F811
    args = ["--arch", "topk", "--k", "4", "--aux-k", "8"]
    launch(2, train_args(cache, tmp_path / "ref", *args, steps=1500, every=50))
    out = tmp_path / "cut"
    first, second = two_machines(train_args(cache, out, *args, steps=1500, every=50))
    deadline = time.time() + 200
    while time.time() < deadline and len(RunDir(out).checkpoints()) < 2:
        time.sleep(0.02)
    workers = children(second.pid)
    assert len(workers) == 1, "the second machine's torchrun should have started one worker"
    os.kill(workers[0], signal.SIGKILL)
    killed = time.time()
    _, err = first.communicate(timeout=200)
    assert time.time() - killed < 60, "process 0 should stop within PIPELINE_PEER_TIMEOUT"
    assert first.returncode != 0, "the run should have been cut"
    # the survivor names the lost process; the second machine's launcher names the signal
    assert "process 0 of 2 lost process 1 (no heartbeat for" in err, err[-3000:]
    assert "SIGKILL" in second.communicate(timeout=200)[1]
    assert not (out / "sae_weights.safetensors").exists()
    launch(2, train_args(cache, out, *args, "--resume", steps=1500, every=50))
    assert (out / "sae_weights.safetensors").read_bytes() == \
        (tmp_path / "ref" / "sae_weights.safetensors").read_bytes()


@pytest.mark.slow
def test_refused_data_parallel_runs_exit_2_before_writing(cache, tmp_path):  # noqa: F811
    uneven = launch(2, train_args(cache, tmp_path / "u", "--batch-size", "63"), ok=False)
    assert "--batch-size 63 is not divisible by the 2 processes" in uneven.stderr
    assert "exitcode  : 2" in uneven.stderr and not (tmp_path / "u").exists()
    batchtopk = launch(2, train_args(cache, tmp_path / "b", "--arch", "batchtopk",
                                     "--no-sparse"), ok=False)
    assert "--arch batchtopk --no-sparse cannot train data-parallel" in batchtopk.stderr
    assert not (tmp_path / "b").exists()
