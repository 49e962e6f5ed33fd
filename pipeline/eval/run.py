"""`pipeline eval SAE_DIR`: reconstruction metrics on held-out cache chunks and the cross-entropy
cost of splicing the SAE into the model, written to SAE_DIR/eval.json."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from cache_schema import Manifest, open_cache
from pipeline import models
from pipeline.data import ActivationLoader
from pipeline.data.reader import ChunkReader
from pipeline.devices import resolve_device
from pipeline.eval.absorption import AbsorptionConfig
from pipeline.eval.config import EvalConfig
from pipeline.eval.letters import alpha_words, measure_absorption
from pipeline.eval.splice import spliced_ce
from pipeline.paths import check_writable
from pipeline.remote import local_cache
from pipeline.run import (
    EVAL_FILE,
    FREQ_FILE,
    WORDS_FILE,
    RunDir,
    check_cache_source,
    check_sae_fits_cache,
)
from pipeline.sae.recon import reconstruction_metrics


def holdout_sequences(cache: str, m: Manifest, chunks: list[int], n: int) -> np.ndarray:
    reader = ChunkReader(cache, m)
    seqs = [reader.tokens(k).reshape(-1, m.context_length) for k in chunks]
    return np.concatenate(seqs)[:n]


def finite_or_null(result: dict) -> dict:
    """The result with every non-finite number as None (JSON null: NaN is not JSON), warning on
    stderr with the names of those metrics."""
    bad: list[str] = []

    def clean(value, name: str):
        if isinstance(value, dict):
            return {k: clean(v, f"{name}.{k}" if name else k) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v, f"{name}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(name)
            return None
        return value

    out = clean(result, "")
    if bad:
        print(f"warning: non-finite metrics written as null: {', '.join(bad)}", file=sys.stderr)
    return out


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate a saved SAE; writes eval.json (and latent frequencies) into its folder."""
    sae_dir = cfg.sae_dir
    check_writable(sae_dir, (EVAL_FILE, FREQ_FILE) + ((WORDS_FILE,) if cfg.absorption else ()),
                   flag="SAE_DIR")
    folder = RunDir(sae_dir)
    sae = folder.load_sae()
    run = folder.read_config()
    cache = folder.cache(cfg.cache)
    root = local_cache(cache)
    m = open_cache(root)
    layer = check_sae_fits_cache(sae.cfg, m, cache)
    check_cache_source(sae_dir, run, sae.cfg, m, cache)
    holdout_chunks = cfg.holdout_chunks
    if holdout_chunks is None:
        holdout_chunks = run.get("holdout_chunks") or 1
        if not run.get("holdout_chunks"):
            print(f"warning: {sae_dir} was trained without held-out chunks; evaluating on the "
                  "cache's last chunk, which it may have seen", file=sys.stderr)
    dev = resolve_device(cfg.device)
    with ActivationLoader(cache, layer, stream=cfg.stream, holdout_chunks=holdout_chunks,
                          device=dev) as loader:
        chunks = loader.holdout_chunk_ids
        metrics, freq = reconstruction_metrics(sae.to(dev), loader.holdout())
    result = {"sae": str(sae_dir), "cache": str(cache), "cache_id": m.cache_id,
              "hook": sae.cfg["metadata"]["hook_name"], "stream": cfg.stream,
              "holdout_chunks": chunks, **metrics}
    if cfg.ce_sequences > 0:
        tokens = holdout_sequences(root, m, chunks, cfg.ce_sequences)
        lm = models.load_model_of(m, cfg.model, dev)
        bar = tqdm(total=len(tokens), unit="seq", desc="spliced CE", disable=not cfg.progress,
                   file=sys.stderr)
        result.update(spliced_ce(lm, layer, sae, tokens, m.special_token_ids,
                                 progress=bar.update))
        bar.close()
    if cfg.absorption:
        result["absorption"] = run_absorption(sae, m, layer, cfg.model, dev,
                                              cfg.absorption_every, sae_dir, cfg.progress)
    result = finite_or_null(result)
    folder.eval_json.write_text(json.dumps(result, indent=1, allow_nan=False))
    save_file({"freq": freq.cpu()}, str(folder.latent_freq))
    return result


def run_absorption(sae, m: Manifest, layer: int, model: str | None, device: str, every: int,
                   out_dir: Path, progress: bool) -> dict:
    """First-letter absorption (pipeline.eval.absorption) with the model truncated after the
    SAE's layer; the word sample goes to absorption_words.json."""
    src = models.model_source_of(m, model)
    tok = models.load_tokenizer(src)
    cfg = AbsorptionConfig(every=every)
    base = models.load_truncated(src, layer + 1, torch.float32 if device == "cpu"
                                 else torch.bfloat16, device)
    # the train and test prompts, then the fresh prompts of the scored words (about 15% more)
    bar = tqdm(total=len(alpha_words(tok, every)), unit="prompt", desc="absorption",
               disable=not progress, file=sys.stderr)
    result, sample = measure_absorption(tok, base, layer, sae.cpu(), cfg, progress=bar.update)
    bar.close()
    (out_dir / WORDS_FILE).write_text(json.dumps(sample))
    return result
