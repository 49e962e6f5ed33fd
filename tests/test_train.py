"""pipeline train: outputs, resume to identical bytes, NaN stop, clear errors, the static step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cache_schema.files import file_sha256
from cache_schema.synthetic import write_synthetic_cache
from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.run import RunDir, rolling_variance
from pipeline.sae import build_sae, sae_config
from pipeline.train.config import TrainConfig
from pipeline.train.step import TrainStep
from pipeline.train.trainer import train

D = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train") / "cache"
    write_synthetic_cache(root, n_chunks=6, rows_per_chunk=512, d_model=D, layers=(1, 3),
                          context_length=64, seed=0, index_column=False)
    return root


def config(cache: Path, out: Path, **kw) -> TrainConfig:
    base = {"cache": str(cache), "out": str(out), "layer": 1, "arch": "relu", "expansion": 4,
            "batch_size": 128, "steps": 60, "log_every": 10, "checkpoint_every": 20,
            "lr": 1e-3, "lr_warmup_steps": 5, "device": "cpu", "progress": False}
    return TrainConfig.from_flat(**{**base, **kw})


def test_train_writes_saelens_folder_metrics_plot_and_audit(cache, tmp_path):
    out = tmp_path / "run"
    summary = train(config(cache, out, holdout_chunks=1))
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["d_in"] == D and cfg["d_sae"] == 4 * D
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    weights = load_file(str(out / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (D, 4 * D) and weights["W_dec"].shape == (4 * D, D)
    rows = RunDir(out).read_metrics()
    assert [r["step"] for r in rows] == list(range(10, 61, 10))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(len(r["step_mse"]) == 10 for r in rows)
    assert (out / "training.png").stat().st_size > 10_000
    audit = [json.loads(line) for line in (out / "audit.log").read_text().splitlines()]
    logged = {a["file"]: a["sha256"] for a in audit}
    assert logged["sae_weights.safetensors"] == file_sha256(out / "sae_weights.safetensors")
    assert {a["step"] for a in audit} >= {20, 40, 60}
    assert [p.name for p in RunDir(out).checkpoints()] == ["step_00000040", "step_00000060"]
    assert 0 < summary["holdout"]["fve"] <= 1 and summary["holdout"]["tokens"] > 0


class Crash(Exception):
    pass


def test_resume_after_a_crash_gives_identical_weights_and_metrics(cache, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    train(config(cache, ref, arch="masked", mask_every=7))
    out = tmp_path / "crashed"
    original = TrainStep.run

    def run_then_crash(self):
        original(self)
        if int(self.step_t) == 47:
            raise Crash
    monkeypatch.setattr(TrainStep, "run", run_then_crash)
    with pytest.raises(Crash):
        train(config(cache, out, arch="masked", mask_every=7))
    monkeypatch.setattr(TrainStep, "run", original)
    assert [p.name for p in RunDir(out).checkpoints()][-1] == "step_00000040"
    with pytest.raises(PipelineError, match="--resume"):
        train(config(cache, out, arch="masked", mask_every=7))
    train(config(cache, out, arch="masked", mask_every=7, resume=True))
    a = (ref / "sae_weights.safetensors").read_bytes()
    b = (out / "sae_weights.safetensors").read_bytes()
    assert a == b

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("steps_per_s", "tokens_per_s")}
                for r in rows]
    assert strip(RunDir(ref).read_metrics()) == strip(RunDir(out).read_metrics())


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(cache, tmp_path,
                                                                         monkeypatch):
    original = TrainStep.load

    def poisoned(self, batch):
        if int(self.step_t) >= 45:
            batch = batch.clone()
            batch[0, 0] = float("nan")
        original(self, batch)
    monkeypatch.setattr(TrainStep, "load", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(PipelineError, match=r"NaN or infinite between steps 40 and 50.*step_00000040"):
        train(config(cache, out))
    last = RunDir(out).checkpoints()[-1]
    assert last.name == "step_00000040"
    audit = {json.loads(x)["file"]: json.loads(x)["sha256"]
             for x in (out / "audit.log").read_text().splitlines()}
    assert audit[f"checkpoints/{last.name}/state.safetensors"] == file_sha256(
        last / "state.safetensors")
    tensors, meta = RunDir(out).load_checkpoint(last)
    assert meta["step"] == 40 and all(torch.isfinite(v).all() for k, v in tensors.items()
                                      if v.is_floating_point())


def test_bad_input_gives_clear_errors(cache, tmp_path):
    with pytest.raises(PipelineError, match=r"layer 2 is not in the cache.*\[1, 3\]"):
        train(config(cache, tmp_path / "a", layer=2))
    with pytest.raises(PipelineError, match="checkpoint-every"):
        config(cache, tmp_path / "b", checkpoint_every=15)
    with pytest.raises(PipelineError, match="unknown architecture"):
        config(cache, tmp_path / "b", arch="nope")
    with pytest.raises(PipelineError, match="k must be between"):
        train(config(cache, tmp_path / "k", arch="topk", k=10**6))
    assert not (tmp_path / "k").exists()  # nothing created for a run that cannot start
    with pytest.raises(PipelineError, match="needs a CUDA device"):
        train(config(cache, tmp_path / "c", cuda_graph="on"))
    assert not (tmp_path / "c").exists()
    train(config(cache, tmp_path / "d", steps=20))
    with pytest.raises(PipelineError, match=r"settings differ.*lr"):
        train(config(cache, tmp_path / "d", steps=20, lr=5e-4, resume=True))


def test_resume_refuses_a_cache_that_changed_under_the_run(tmp_path):
    import shutil

    root = tmp_path / "cache"
    write_synthetic_cache(root, n_chunks=2, rows_per_chunk=256, d_model=16, context_length=32)
    out = tmp_path / "run"
    train(config(root, out, layer=0, steps=20, batch_size=32))
    shutil.rmtree(root)
    write_synthetic_cache(root, n_chunks=2, rows_per_chunk=256, d_model=24, context_length=32)
    with pytest.raises(PipelineError, match=r"trained on cache .* now holds cache"):
        train(config(root, out, layer=0, steps=20, batch_size=32, resume=True))


def test_train_refuses_an_incomplete_cache(tmp_path):
    from cache_schema import read_manifest, write_manifest

    root = tmp_path / "cache"
    write_synthetic_cache(root, n_chunks=2, rows_per_chunk=256, d_model=16, context_length=32)
    m = read_manifest(root)
    m.status = "writing"
    write_manifest(root, m)
    result = CliRunner().invoke(app, ["train", "--cache", str(root), "--out",
                                      str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2
    assert "not complete" in result.output and "Traceback" not in result.output


def test_cli_train_runs_and_prints_the_summary(cache, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["train", "--cache", str(cache), "-o", str(out), "-l", "3",
                                      "--arch", "topk", "--k", "8", "--steps", "20",
                                      "--batch-size", "64", "--log-every", "10",
                                      "--checkpoint-every", "10", "--no-progress",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["arch"] == "topk" and summary["layer"] == 3
    assert json.loads((out / "cfg.json").read_text())["k"] == 8


def test_static_step_reads_only_its_input_buffer_and_matches_a_plain_step():
    torch.manual_seed(0)
    cfg = sae_config(arch="relu", d_in=16, d_sae=64)
    a = build_sae(cfg, generator=torch.Generator().manual_seed(1))
    b = build_sae(cfg, generator=torch.Generator().manual_seed(1))
    step = TrainStep(a, 32, 16, scale=2.0, total_steps=10, lr=1e-3, grad_clip=1.0, history=4)
    opt = torch.optim.Adam(b.parameters(), lr=1e-3)
    for i in range(6):
        x = torch.randn(32, 16)
        step.load(x)
        x.fill_(1e6)  # the step must have copied the batch, not kept a reference
        step.run()
        loss, _, _, _ = b.loss(step.x.clone() * 2.0, torch.tensor(1.0))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
        opt.step()
        b.normalize_decoder()
        assert int(step.step_t) == i + 1
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    sums = step.take_sums()
    assert sums["steps"] == 6 and sums["nonfinite"] == 0
    assert step.take_sums()["steps"] == 0
    assert step.history.shape == (4,) and torch.all(step.history > 0)


def test_adam_sees_column_major_w_enc_as_a_contiguous_view_and_saves_it_in_its_shape():
    sae = build_sae(sae_config(arch="topk", d_in=8, d_sae=32, k=4),
                    generator=torch.Generator().manual_seed(0))
    assert not sae.W_enc.is_contiguous()  # [d_in, d_sae] over [d_sae, d_in] memory
    step = TrainStep(sae, 16, 8, 1.0, total_steps=10, lr=1e-2)
    seen = step.views["W_enc"][1]
    assert seen.is_contiguous() and seen.data_ptr() == sae.W_enc.data_ptr()
    assert all(q.is_contiguous() for q in step.opt.param_groups[0]["params"])
    before = sae.W_enc.detach().clone()
    for _ in range(3):
        step.load(torch.randn(16, 8))
        step.run()
    assert not torch.equal(before, sae.W_enc)  # Adam's view moved the parameter itself
    saved = step.state_tensors()
    assert saved["adam.W_enc.exp_avg"].shape == sae.W_enc.shape
    torch.testing.assert_close(saved["adam.W_enc.exp_avg"].t(), step.opt.state[seen]["exp_avg"])
    other = TrainStep(build_sae(sae.cfg), 16, 8, 1.0, total_steps=10, lr=1e-2)
    other.load_state_tensors({k: v.contiguous().clone() for k, v in saved.items()})
    torch.testing.assert_close(other.opt.state[other.views["W_enc"][1]]["exp_avg_sq"],
                               step.opt.state[seen]["exp_avg_sq"])


def test_schedule_warms_up_and_decays():
    sae = build_sae(sae_config(arch="relu", d_in=4, d_sae=8))
    step = TrainStep(sae, 2, 4, 1.0, total_steps=100, lr=1.0, lr_warmup_steps=10,
                     lr_decay_fraction=0.2, l1_warmup_steps=20)
    values = {}
    for s in (0, 4, 9, 50, 80, 90, 99):
        step.step_t.fill_(s)
        lr, l1 = step._schedule()
        values[s] = (round(float(lr), 4), round(float(l1), 4))
    assert values[0] == (0.1, 0.05) and values[9] == (1.0, 0.5) and values[50] == (1.0, 1.0)
    assert values[90] == (0.5, 1.0) and values[99] == (0.05, 1.0)


def test_rolling_variance_matches_numpy():
    import numpy as np

    v = np.random.default_rng(0).normal(size=50)
    r = rolling_variance(v, 10)
    assert np.isnan(r[8]) and np.isclose(r[9], v[:10].var()) and np.isclose(r[-1], v[-10:].var())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_and_eager_steps_give_the_same_weights():
    cfg = sae_config(arch="masked", d_in=64, d_sae=256)
    weights = []
    for graph in (False, True):
        sae = build_sae(cfg, generator=torch.Generator().manual_seed(0)).cuda()
        step = TrainStep(sae, 128, 64, 1.5, 30, 1e-3, lr_warmup_steps=5, use_graph=graph)
        gen = torch.Generator().manual_seed(1)
        for s in range(30):
            step.load(torch.randn(128, 64, generator=gen).cuda())
            step.run()
            sae.refresh(s + 1)
        torch.cuda.synchronize()
        weights.append({k: v.clone() for k, v in sae.state_dict().items()})
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_kill_9_then_resume_gives_bit_identical_weights(cache, tmp_path):
    args = [sys.executable, "-m", "pipeline.cli", "train", "--cache", str(cache), "-l", "1",
            "--arch", "relu", "--steps", "2000", "--batch-size", "128", "--log-every", "10",
            "--checkpoint-every", "20", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*args, "-o", str(tmp_path / "ref")], env=env, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "-o", str(out)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(RunDir(out).checkpoints()) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "sae_weights.safetensors").exists(), "the run finished before the kill"
    resumed = subprocess.run([*args, "-o", str(out), "--resume"], env=env, capture_output=True,
                             text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert (tmp_path / "ref" / "sae_weights.safetensors").read_bytes() == \
        (out / "sae_weights.safetensors").read_bytes()


