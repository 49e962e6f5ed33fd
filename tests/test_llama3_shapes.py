"""Llama-3's structure at tiny sizes, through extract (float32 and bfloat16, compute and storage),
train and eval: grouped-query attention 4:1, rope theta 500000, and a tokenizer with Llama-3's
special tokens, whose `<|reserved_special_token_0|>` becomes the mask token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_schema import TOKENS, activation_array, hook_name, open_cache, read_manifest, verify
from cache_schema.dtypes import decode
from cache_schema.store import array_specs, chunk_file
from pipeline.cli import app
from pipeline.models.synthetic import LLAMA3_SPECIALS, llama3_tokenizer, save_random_llama

BOS, EOS, RESERVED = LLAMA3_SPECIALS[:3]
CTX, R, LAYER = 64, 512, 2
runner = CliRunner()


def make_llama3_like(folder: Path) -> Path:
    """A random Llama with Llama-3's structure (GQA 8 heads : 2 KV heads, rope theta 500000, no
    tied embeddings) and a byte-level BPE tokenizer with Llama-3's special tokens (no unk)."""
    save_random_llama(folder, dict(hidden_size=64, intermediate_size=224, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2,
                                   rope_theta=500000.0, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False),
                      llama3_tokenizer())
    return folder


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> Path:
    return make_llama3_like(tmp_path_factory.mktemp("llama3") / "model")


def extract(out: Path, model: Path, corpus: Path, compute: str, storage: str) -> None:
    r = runner.invoke(app, ["extract", "--out", str(out), "--model", str(model), "--corpus",
                            str(corpus), "--layer", str(LAYER), "--tokens", str(4 * R),
                            "--context-length", str(CTX), "--rows-per-chunk", str(R),
                            "--batch-size", "4", "--compute-dtype", compute, "--dtype", storage,
                            "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output


def stored(root: Path, stream: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, activations as float32) of every chunk, read from the files (SPEC.md §7)."""
    m = read_manifest(root)
    specs = array_specs(m)
    name = activation_array(stream, hook_name(LAYER))
    tokens = [np.fromfile(chunk_file(root, TOKENS, 1, k), dtype=specs[TOKENS][1])
              for k in range(m.n_chunks)]
    acts = [decode(np.fromfile(chunk_file(root, name, 2, k), dtype=specs[name][1]),
                   m.storage_dtype).reshape(R, m.d_model) for k in range(m.n_chunks)]
    return np.concatenate(tokens), np.concatenate(acts).astype(np.float32)


def reference(model: Path, tokens: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """resid_post of LAYER from an independent HF forward of the whole model, one sequence at
    a time (output_hidden_states[LAYER + 1])."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    out = []
    with torch.inference_mode():
        for seq in tokens.reshape(-1, CTX):
            h = lm(torch.from_numpy(seq[None]).long(), output_hidden_states=True).hidden_states
            out.append(h[LAYER + 1][0].float().numpy())
    return np.concatenate(out)


@pytest.mark.slow
@pytest.mark.parametrize("compute,storage,atol", [("float32", "float32", 1e-4),
                                                  ("bfloat16", "bfloat16", 0.1),
                                                  ("float32", "bfloat16", 0.05)])
def test_extract_matches_an_independent_forward(tmp_path, llama3, corpus, compute, storage,
                                                 atol):
    root = tmp_path / "cache"
    extract(root, llama3, corpus, compute, storage)
    assert verify(root)[1] == []
    m = open_cache(root)
    assert m.compute_dtype == compute and m.storage_dtype == storage
    tok = json.loads((llama3 / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert m.bos_token_id == ids[BOS] and m.mask_token_id == ids[RESERVED]
    assert {ids[s] for s in LLAMA3_SPECIALS} <= set(m.special_token_ids)
    tokens, acts = stored(root, "clean")
    assert (tokens.reshape(-1, CTX)[:, 0] == ids[BOS]).all()
    want = reference(llama3, tokens, getattr(torch, compute))
    scale = np.abs(want).max()
    np.testing.assert_allclose(acts, want, atol=atol * scale, rtol=0)
    _, masked = stored(root, "masked")
    assert not np.allclose(acts, masked)  # the masked stream saw other inputs


@pytest.mark.slow
def test_bfloat16_cache_trains_and_evaluates(tmp_path, llama3, corpus):
    root = tmp_path / "cache"
    extract(root, llama3, corpus, "bfloat16", "bfloat16")
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--cache", str(root), "-o", str(run), "--arch", "topk",
                            "--k", "8", "--expansion", "4", "--steps", "30", "--batch-size", "64",
                            "--layer", str(LAYER), "--holdout-chunks", "1", "--device", "cpu",
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(run), "--ce-sequences", "2", "--device", "cpu",
                            "--model", str(llama3)])
    assert r.exit_code == 0, r.output
    result = json.loads((run / "eval.json").read_text())
    values = [v for v in result.values() if isinstance(v, float)]
    assert values and all(np.isfinite(values)), result
