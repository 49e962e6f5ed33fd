"""A new architecture is one file plus one registry line, for training and inference alike: a toy
one defined here is registered, trained, saved, loaded, evaluated (`pipeline eval`) and browsed
(`pipeline features`) with no other change. And a train_config.json written before the
architectures had their own config classes is still read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.run import load_saelens
from pipeline.sae import ARCHITECTURES, SAE, register_sae_class
from pipeline.sae.relu import L1Config
from pipeline.train.config import TrainConfig
from pipeline.train.trainer import train

FIXTURE = Path(__file__).parent / "fixtures" / "train_config_before_issue16.json"


@dataclass
class ShiftedConfig(L1Config):
    shift: float = 0.05
    """toy: subtracted from every pre-activation before the ReLU."""

    RANGES: ClassVar[dict[str, tuple]] = {"shift": (0, None, True)}


class ShiftedReluSAE(SAE):
    """z = relu(pre - shift): saved as a standard SAE with the shift folded into b_enc."""

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre - self.cfg.shift)

    def export_encoder(self):
        return self.W_enc, self.b_enc - self.cfg.shift


@pytest.fixture
def shifted():
    register_sae_class("shifted", ShiftedReluSAE, ShiftedConfig)
    yield
    del ARCHITECTURES["shifted"]


def test_a_registered_toy_architecture_trains_saves_loads_evaluates_and_browses(
        shifted, tiny_cache, tiny_model, tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig.from_flat(cache=str(tiny_cache), out=str(run), layer=1, arch="shifted",
                                shift=0.1, expansion=2, batch_size=64, steps=8, log_every=4,
                                checkpoint_every=4, holdout_chunks=1, device="cpu",
                                progress=False)
    summary = train(cfg)
    assert summary["arch"] == "shifted"
    assert json.loads((run / "train_config.json").read_text())["shift"] == 0.1
    saved = json.loads((run / "cfg.json").read_text())
    assert saved["architecture"] == "standard" and saved["metadata"]["trained_arch"] == "shifted"

    sae = load_saelens(run)
    assert sae.kind is ShiftedReluSAE
    x = torch.randn(5, saved["d_in"])
    assert torch.allclose(sae.encode(x, torch.tensor([0, 3])), sae.encode(x)[:, [0, 3]], atol=1e-6)

    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(run), "--ce-sequences", "0", "--device", "cpu",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "eval.json").read_text())["hook"] == "blocks.1.hook_resid_post"
    result = runner.invoke(app, ["features", str(run), "--latents", "0-3", "--model",
                                 str(tiny_model), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (run / "features" / "index.html").is_file()
    result = runner.invoke(app, ["audit", str(run)])
    assert "l1_coefficient" in result.output


def test_a_train_config_json_written_before_the_change_is_read_and_resumes():
    old = json.loads(FIXTURE.read_text())
    settings = {k: v for k, v in old.items() if k not in ("cache_id", "model_fingerprint")}
    cfg = TrainConfig.from_flat(**settings)
    assert cfg.arch == "topk" and cfg.sae["k"] == 16
    mine = cfg.identity()  # what --resume compares, key for key
    assert {k: v for k, v in mine.items() if k in settings} == settings
    # settings added since (--tf32) read as their defaults when a saved run lacks them
    assert {k: v for k, v in mine.items() if k not in settings} == {"tf32": False}
