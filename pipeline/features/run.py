"""`pipeline features SAE_DIR`: check the inputs, stream the held-out chunks once, look up the
tokens each latent's decoder direction promotes, and write the static site + features.json."""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache_schema import TOKENS, Manifest, activation_array, chunk_file, hook_name, open_cache
from cache_schema.dtypes import read_dtype
from pipeline import models
from pipeline.data.reader import ChunkReader
from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.features.collect import PAD, block_rows, collect, read_blocks
from pipeline.features.config import FeaturesConfig
from pipeline.features.site import SITE_FILES, write_site
from pipeline.paths import check_writable
from pipeline.remote import local_cache
from pipeline.run import RunDir, check_cache_source, check_sae_fits_cache

DEFAULT_LATENTS = 512
N_LOGITS = 10


def parse_latents(spec: str | None, d_sae: int) -> list[int]:
    """'0-511', '3,17,40', '0-9,100' -> sorted distinct indices; None -> the first 512 (or all)."""
    if spec is None or not spec.strip():
        return list(range(min(DEFAULT_LATENTS, d_sae)))
    if spec.strip() == "all":
        return list(range(d_sae))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, hi = (int(v) for v in part.split("-", 1)) if "-" in part else (int(part),) * 2
            if hi < lo:
                raise ValueError
        except ValueError:
            raise PipelineError(f"cannot read latents {spec!r}: give indices and ranges like "
                                "'0-511' or '3,17,40-49', or 'all'") from None
        if not 0 <= lo <= hi < d_sae:  # checked before the range is built: it may be huge
            bad = lo if not 0 <= lo < d_sae else hi
            raise PipelineError(f"latent {bad} is out of range: this SAE has {d_sae} latents "
                                f"(0-{d_sae - 1})")
        out.update(range(lo, hi + 1))
    return sorted(out)


def holdout_chunk_ids(sae_dir: Path, run: dict, m: Manifest, holdout_chunks: int | None
                      ) -> list[int]:
    """The last N chunks: N from --holdout-chunks, else the run's settings `run`."""
    if holdout_chunks is None:
        holdout_chunks = run.get("holdout_chunks") or 0
        if holdout_chunks <= 0:
            raise PipelineError(f"{sae_dir} has no held-out chunks (its train_config.json "
                                "holds out none, or there is none): pass --holdout-chunks N to "
                                "browse the cache's last N chunks anyway (it may have seen them)")
    if not 1 <= holdout_chunks <= m.n_chunks:
        raise PipelineError(f"--holdout-chunks must be in [1, {m.n_chunks}] for this cache of "
                            f"{m.n_chunks} chunks, got {holdout_chunks}")
    return list(range(m.n_chunks - holdout_chunks, m.n_chunks))


def check_tokens(root: Path, chunks: list[int]) -> None:
    """The cache must hold token ids for the chunks: the browser shows text."""
    missing = [k for k in chunks if not chunk_file(root, TOKENS, 1, k).is_file()]
    if not Path(root, TOKENS, "zarr.json").is_file() or missing:
        raise PipelineError(f"cache {root} has no token ids ({TOKENS}/ array"
                            + (f", chunk {missing[0]}" if missing else "") + " missing): the "
                            "feature browser needs them to show text; re-extract the cache with "
                            "`pipeline extract`")


def logit_effects(lm, w_dec: torch.Tensor, k: int = N_LOGITS) -> tuple[torch.Tensor, ...]:
    """Tokens a decoder direction promotes and suppresses, as SAE-Vis computes them: decoder row
    times the final norm's weight, times the unembedding. Returns top/bottom (values, ids)."""
    norm = lm.get_decoder().norm.weight if hasattr(lm, "get_decoder") else lm.model.norm.weight
    w_u = lm.get_output_embeddings().weight  # [vocab, d_model]
    with torch.no_grad():
        logits = (w_dec.to(w_u.device, torch.float32) * norm.float()) @ w_u.float().T
        k = min(k, logits.shape[1])
        up, down = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
    return up.values.cpu(), up.indices.cpu(), down.values.cpu(), down.indices.cpu()


class TokenText:
    """Token id -> text, one tokenizer call per distinct id."""

    def __init__(self, tok):
        self.tok, self.memo = tok, {}

    def __call__(self, i: int) -> str:
        if i not in self.memo:
            self.memo[i] = self.tok.decode([i])
        return self.memo[i]


def label_of(examples: list[dict], promoted: list[dict]) -> str:
    """A short label: the most frequent firing tokens of the top examples (else the promoted)."""
    counts = Counter(e["text"][e["center"]] for e in examples)
    words = [w for w, _ in counts.most_common(3)] or [p["token"] for p in promoted[:3]]
    return " | ".join(w.strip() or repr(w) for w in words)


def build_features(stats, decode: TokenText, logits, seq_len: int) -> list[dict]:
    """The per-latent records of features.json."""
    up_v, up_i, down_v, down_i = logits
    width = stats.hist.width.tolist()
    out = []
    for j, latent in enumerate(stats.latents):
        examples = []
        for slot in range(stats.top.n):
            value = float(stats.top.values[j, slot])
            if value <= 0:
                break
            row = int(stats.top.rows[j, slot])
            ids = stats.top.context[j, slot].tolist()
            acts = stats.top.context_acts[j, slot].tolist()
            keep = [t != PAD for t in ids]
            center = sum(keep[:stats.top.m])
            ids = [t for t, ok in zip(ids, keep, strict=True) if ok]
            examples.append({"activation": value, "row": row, "sequence": row // seq_len,
                             "position": row % seq_len, "center": center, "token_ids": ids,
                             "text": [decode(t) for t in ids],
                             "activations": [round(a, 5) for a, ok in zip(acts, keep, strict=True) if ok]})
        promoted = [{"token": decode(int(t)), "id": int(t), "logit": float(v)}
                    for t, v in zip(up_i[j], up_v[j], strict=True)]
        suppressed = [{"token": decode(int(t)), "id": int(t), "logit": float(v)}
                      for t, v in zip(down_i[j], down_v[j], strict=True)]
        out.append({"index": latent, "frequency": int(stats.fired[j]) / max(stats.tokens, 1),
                    "fired": int(stats.fired[j]), "max_activation": float(stats.max_act[j]),
                    "label": label_of(examples, promoted),
                    "histogram": {"bin_width": width[j],
                                  "counts": stats.hist.counts[j].tolist()},
                    "examples": examples, "promoted": promoted, "suppressed": suppressed})
    return out


def features(cfg: FeaturesConfig) -> Path:
    """Build the feature browser of a saved SAE; returns the path of index.html."""
    started = time.perf_counter()
    sae_dir, examples, context, tokens = cfg.sae_dir, cfg.examples, cfg.context, cfg.tokens
    folder = RunDir(sae_dir)
    site = Path(cfg.out) if cfg.out is not None else folder.features
    check_writable(site, SITE_FILES, flag="--out")
    sae = folder.load_sae()
    chosen = parse_latents(cfg.latents, sae.cfg["d_sae"])
    run = folder.read_config()
    cache = folder.cache(cfg.cache)
    if examples < 1 or context < 0:
        raise PipelineError(f"--examples must be at least 1 and --context at least 0, got "
                            f"{examples} and {context}")
    if tokens is not None and tokens < 1:
        raise PipelineError(f"--tokens must be at least 1, got {tokens}")
    root = local_cache(cache)
    m = open_cache(root)
    layer = check_sae_fits_cache(sae.cfg, m, str(cache))
    check_cache_source(sae_dir, run, sae.cfg, m, str(cache))
    chunks = holdout_chunk_ids(sae_dir, run, m, cfg.holdout_chunks)
    check_tokens(Path(root), chunks)
    src = models.model_source_of(m, cfg.model)  # fail on a missing model before the long pass
    dev = resolve_device(cfg.device)
    sae = sae.to(dev)

    reader = ChunkReader(root, m)
    bf16 = m.storage_dtype == "bfloat16"
    np_dtype = np.dtype(read_dtype(m.storage_dtype))
    total = m.rows_per_chunk * len(chunks) if tokens is None else min(
        tokens, m.rows_per_chunk * len(chunks))
    block = block_rows(m.context_length, m.rows_per_chunk, len(chosen))
    if tokens is not None:  # --tokens is honoured to whole sequences
        block = min(block, -(-tokens // m.context_length) * m.context_length)
    blocks = read_blocks(reader, activation_array("clean", hook_name(layer)), chunks,
                         m.rows_per_chunk, m.d_model, np_dtype, bf16, block, tokens)
    bar = tqdm(total=total, unit="tok", desc="features", disable=not cfg.progress, file=sys.stderr)
    stats = collect(sae, blocks, chosen, examples, context, m.context_length,
                    m.special_token_ids, dev, progress=bar.update)
    bar.close()

    lm = models.load_model_of(m, cfg.model, dev)
    logits = logit_effects(lm, sae.W_dec[torch.tensor(chosen, device=sae.W_dec.device)])
    decode = TokenText(models.load_tokenizer(src))
    data = {"sae": str(sae_dir), "cache": str(cache), "cache_id": m.cache_id,
            "hook": hook_name(layer), "stream": "clean", "holdout_chunks": chunks,
            "tokens_scanned": stats.tokens, "d_sae": sae.cfg["d_sae"], "examples": examples,
            "context": context, "seconds": None,
            "latents": build_features(stats, decode, logits, m.context_length)}
    data["seconds"] = round(time.perf_counter() - started, 2)
    return write_site(site, data)
