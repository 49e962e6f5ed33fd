"""pipeline eval: known-answer SAEs (exact and zero) give known metrics; mismatches are refused."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.eval.config import EvalConfig
from pipeline.eval.run import evaluate
from pipeline.run import save_saelens
from pipeline.sae import build_sae, sae_config

D = 64  # the tiny model's width


def hand_built(folder, layer: int = 1, d_in: int = D, exact: bool = True):
    """exact: z = [relu(x), relu(-x)] and x_hat = x exactly; otherwise x_hat = 0."""
    sae = build_sae(sae_config(arch="relu", d_in=d_in, d_sae=2 * d_in))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0) if exact else torch.zeros(2 * d_in, d_in))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    save_saelens(folder, sae, 1.0, {"hook_name": f"blocks.{layer}.hook_resid_post",
                                    "model_name": "tiny"})
    return folder


def test_an_exact_sae_recovers_all_the_loss_and_a_zero_sae_none(tiny_cache, tiny_model, tmp_path):
    exact = evaluate(EvalConfig(hand_built(tmp_path / "exact"), cache=str(tiny_cache), holdout_chunks=1,
                     ce_sequences=4, model=str(tiny_model), device="cpu", progress=False))
    assert exact["fve"] == pytest.approx(1.0, abs=1e-5) and exact["mse"] < 1e-8
    assert exact["ce_increase"] == pytest.approx(0.0, abs=1e-5)
    assert exact["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["ce_zero_ablation"] > exact["ce_clean"]
    assert exact["tokens"] == 256 - 256 // 32  # one chunk, BOS rows left out
    zero = evaluate(EvalConfig(hand_built(tmp_path / "zero", exact=False), cache=str(tiny_cache),
                    holdout_chunks=1, ce_sequences=4, model=str(tiny_model), device="cpu",
                    progress=False))
    assert zero["ce_sae"] == pytest.approx(zero["ce_zero_ablation"], abs=1e-5)
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert zero["fve"] < 0.01
    saved = json.loads((tmp_path / "zero" / "eval.json").read_text())
    assert saved["ce_sae"] == zero["ce_sae"]


def test_latent_statistics(tiny_cache, tmp_path):
    result = evaluate(EvalConfig(hand_built(tmp_path / "s"), cache=str(tiny_cache), holdout_chunks=1,
                      ce_sequences=0, device="cpu", progress=False))
    # every input coordinate is nonzero, so exactly one of relu(x_i), relu(-x_i) fires
    assert result["l0"] == pytest.approx(D)
    assert 0.0 <= result["dead_fraction"] < 1.0 and result["dense_fraction"] > 0.5
    assert "ce_sae" not in result


def test_mismatched_sae_and_cache_are_refused(tiny_cache, tiny_model, tmp_path):
    with pytest.raises(PipelineError, match=r"reads blocks\.3\.hook_resid_post.*holds"):
        evaluate(EvalConfig(hand_built(tmp_path / "a", layer=3), cache=str(tiny_cache), ce_sequences=0))
    with pytest.raises(PipelineError, match=r"d_in is 32.*d_model 64"):
        evaluate(EvalConfig(hand_built(tmp_path / "b", d_in=32), cache=str(tiny_cache), ce_sequences=0))
    with pytest.raises(PipelineError, match="pass --cache"):
        evaluate(EvalConfig(hand_built(tmp_path / "c")))
    with pytest.raises(PipelineError, match="pass it with --model"):
        evaluate(EvalConfig(tmp_path / "c", cache=str(tiny_cache), holdout_chunks=1, ce_sequences=2,
                 device="cpu"))
    (tmp_path / "c" / "sae_weights.safetensors").unlink()
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "c"), "--cache", str(tiny_cache)])
    assert result.exit_code == 2 and "sae_weights.safetensors is missing" in result.output


def test_a_different_model_is_refused(tiny_cache, tmp_path):
    from tests.conftest import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", n_layers=5, d_model=D)
    with pytest.raises(PipelineError, match="not the one that made this cache"):
        evaluate(EvalConfig(hand_built(tmp_path / "e"), cache=str(tiny_cache), holdout_chunks=1,
                 ce_sequences=2, model=str(other), device="cpu"))


def test_eval_with_absorption_records_the_word_sample(tiny_cache, tiny_model, tmp_path):
    folder = hand_built(tmp_path / "abs")
    result = evaluate(EvalConfig(folder, cache=str(tiny_cache), holdout_chunks=1, ce_sequences=0,
                      model=str(tiny_model), device="cpu", progress=False, absorption=True,
                      absorption_every=1))
    absorption = result["absorption"]
    assert {"mean_absorption_fraction", "mean_full_absorption", "letters", "config"} <= set(
        absorption)
    sample = json.loads((folder / "absorption_words.json").read_text())
    assert sample["every"] == 1 and len(sample["words"]) == absorption["n_words"] > 0
    assert json.loads((folder / "eval.json").read_text())["absorption"]["n_words"] == len(
        sample["words"])


def test_spliced_ce_from_a_baseline_runs_only_the_sae_forward(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.eval.splice import spliced_ce
    from pipeline.run import load_saelens

    lm = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    sae = load_saelens(hand_built(tmp_path / "b", exact=False))
    tokens = torch.randint(3, lm.config.vocab_size, (4, 16), generator=torch.Generator()
                           .manual_seed(0)).numpy()
    full = spliced_ce(lm, 1, sae, tokens, [0])
    calls = []
    lm.register_forward_hook(lambda *_: calls.append(1))
    again = spliced_ce(lm, 1, sae, tokens, [0], batch_size=2, baseline=full)
    assert len(calls) == 2  # two batches, the SAE's forward alone in each
    assert again == pytest.approx(full, abs=1e-6)
