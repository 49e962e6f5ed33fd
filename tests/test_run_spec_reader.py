"""pipeline/run/SPEC.md is enough to read a run folder: a reader built from json, hashlib, numpy and
safetensors alone (no pipeline) finds every file where the spec says it is, checks the audit log,
and applies the saved SAE to the cache's raw activations to get eval.json's numbers again."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

# ---------------------------------------------------------------------------------------------
# The reader: written from pipeline/run/SPEC.md (and cache_schema/SPEC.md for the cache) only.

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}")
CHECKPOINT = re.compile(r"step_(\d{8})")
HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_post")


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def spec_audit_log(run: Path) -> dict[str, str]:
    """§4: the last SHA-256 of each logged file, every line checked."""
    last = {}
    for line in (run / "audit.log").read_text().splitlines():
        entry = json.loads(line)
        assert set(entry) == {"time", "step", "file", "sha256"}
        assert TIME.fullmatch(entry["time"]) and isinstance(entry["step"], int)
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) and not entry["file"].startswith("/")
        last[entry["file"]] = entry["sha256"]
    return last


def spec_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """§5: complete checkpoints, oldest first, temporary folders ignored."""
    found = []
    for p in (run / "checkpoints").iterdir():
        match = CHECKPOINT.fullmatch(p.name)
        if match and (p / "state.json").is_file():
            found.append((int(match.group(1)), p))
    return sorted(found)


def spec_encode(cfg: dict, w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """§6: latents of raw activations."""
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    z = np.maximum(pre, 0.0)
    if cfg["architecture"] == "topk":
        kth = -np.sort(-z, axis=1)[:, cfg["k"] - 1:cfg["k"]]
        z = np.where(z >= kth, z, 0.0)
    elif cfg["architecture"] == "jumprelu":
        z = np.where(pre > np.maximum(w["threshold"], 0.0), z, 0.0)
    return z


def cache_rows(cache: Path, layer: int, chunks: list[int]) -> np.ndarray:
    """Clean activations of the hook of `layer` in `chunks`, special tokens dropped (an
    uncompressed float32 cache, read by cache_schema/SPEC.md)."""
    m = read_json(cache / "zarr.json")["attributes"]["manifest"]
    assert m["codec"] == "none" and m["storage_dtype"] == "float32"
    rows = []
    for k in chunks:
        acts = np.fromfile(cache / "clean" / f"blocks.{layer}.hook_resid_post" / "c" / str(k) / "0",
                           dtype="<f4").reshape(m["rows_per_chunk"], m["d_model"])
        tokens = np.fromfile(cache / "tokens" / "c" / str(k), dtype="<i4")
        rows.append(acts[~np.isin(tokens, m["special_token_ids"])])
    return np.concatenate(rows).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# A run written by pipeline train and eval (the only place the pipeline is used).

STEPS, LOG_EVERY, CHECKPOINT_EVERY, LAYER = 40, 10, 10, 2


@pytest.fixture(scope="module", params=["relu", "topk"])
def written(request, tmp_path_factory) -> tuple[Path, Path]:
    from cache_schema.synthetic import write_synthetic_cache
    from pipeline.eval.config import EvalConfig
    from pipeline.eval.run import evaluate
    from pipeline.train.config import TrainConfig
    from pipeline.train.trainer import train

    root = tmp_path_factory.mktemp("spec-run")
    write_synthetic_cache(root / "cache", n_chunks=4, rows_per_chunk=256, d_model=16,
                          layers=(1, LAYER), context_length=32, index_column=False)
    run = root / request.param
    train(TrainConfig.from_flat(cache=str(root / "cache"), out=str(run), layer=LAYER,
                                arch=request.param, k=4, expansion=2, batch_size=64, steps=STEPS,
                                log_every=LOG_EVERY, checkpoint_every=CHECKPOINT_EVERY,
                                holdout_chunks=1, device="cpu", progress=False))
    evaluate(EvalConfig(sae_dir=run, ce_sequences=0, device="cpu", progress=False))
    return root / "cache", run


def test_train_config_names_the_cache_and_every_setting(written):
    cache, run = written
    cfg = read_json(run / "train_config.json")
    assert cfg["cache"] == str(cache.resolve()) and Path(cfg["cache"]).is_absolute()
    manifest = read_json(cache / "zarr.json")["attributes"]["manifest"]
    assert cfg["cache_id"] == manifest["cache_id"]
    assert cfg["model_fingerprint"] == manifest["model_fingerprint"]
    assert cfg["layer"] == LAYER and cfg["holdout_chunks"] == 1 and cfg["steps"] == STEPS
    assert "resume" not in cfg and "progress" not in cfg


def test_metrics_rows_carry_every_step_mse(written):
    _, run = written
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for r in rows:
        assert r["tokens"] == r["step"] * 64 and len(r["step_mse"]) == r["steps"] == LOG_EVERY
        assert r["mse"] == pytest.approx(np.mean(r["step_mse"]), rel=1e-5)


def test_the_audit_log_vouches_for_every_file_it_names(written):
    _, run = written
    last = spec_audit_log(run)
    assert {"sae_weights.safetensors", "cfg.json"} <= set(last)
    for name, digest in last.items():
        path = run / name
        if name.startswith("checkpoints/") and not path.exists():
            continue  # an older checkpoint, deleted on purpose
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
    logged = {name.split("/")[1] for name in last if name.startswith("checkpoints/")}
    assert logged == {f"step_{s:08d}" for s in range(CHECKPOINT_EVERY, STEPS + 1,
                                                      CHECKPOINT_EVERY)}


def test_checkpoints_are_the_newest_two_with_their_metrics_offset(written):
    _, run = written
    found = spec_checkpoints(run)
    assert [s for s, _ in found] == [STEPS - CHECKPOINT_EVERY, STEPS]
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    for step, folder in found:
        meta = read_json(folder / "state.json")
        assert meta["step"] == meta["loader_step"] == step
        assert meta["cache_id"] == read_json(run / "train_config.json")["cache_id"]
        assert meta["metrics_offset"] == sum(len(x) for x in lines[:step // LOG_EVERY])
        state = load_file(str(folder / "state.safetensors"))
        assert int(state["train.step"]) == step and state["rng.cpu"].dtype == np.uint8
        assert state["sae.W_dec"].shape == (32, 16) and state["sae.W_enc"].shape == (16, 32)


def test_the_saelens_folder_is_the_last_checkpoint_with_the_scaling_folded_in(written):
    _, run = written
    cfg = read_json(run / "cfg.json")
    meta = cfg["metadata"]
    summary = read_json(run / "summary.json")
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 32 and cfg["normalize_activations"] == "none"
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk"}[meta["trained_arch"]]
    assert int(HOOK.fullmatch(meta["hook_name"]).group(1)) == LAYER == summary["layer"]
    assert meta["sae_lens_version"] == "6.0.0" and meta["context_size"] == 32
    assert meta["norm_scale"] == summary["norm_scale"] != 1.0
    assert summary["files"] == {name: hashlib.sha256((run / name).read_bytes()).hexdigest()
                                for name in ("sae_weights.safetensors", "cfg.json")}
    w = load_file(str(run / "sae_weights.safetensors"))
    state = load_file(str(spec_checkpoints(run)[-1][1] / "state.safetensors"))
    scale = meta["norm_scale"]
    np.testing.assert_array_equal(w["W_enc"], state["sae.W_enc"])
    np.testing.assert_array_equal(w["W_dec"], state["sae.W_dec"])
    np.testing.assert_allclose(w["b_dec"], state["sae.b_dec"] / scale, rtol=1e-6)
    np.testing.assert_allclose(w["b_enc"], state["sae.b_enc"] / scale, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(w["W_dec"], axis=1), 1.0, rtol=1e-5)


def test_the_saved_sae_applied_to_raw_activations_gives_eval_json(written):
    cache, run = written
    cfg, result = read_json(run / "cfg.json"), read_json(run / "eval.json")
    layer = int(HOOK.fullmatch(result["hook"]).group(1))
    x = cache_rows(cache, layer, result["holdout_chunks"])
    w = {k: v.astype(np.float64) for k, v in load_file(str(run / "sae_weights.safetensors")).items()}
    z = spec_encode(cfg, w, x)
    x_hat = z @ w["W_dec"] + w["b_dec"]
    fired = (z != 0).mean(axis=0)
    assert result["tokens"] == len(x)
    assert result["mse"] == pytest.approx(((x - x_hat) ** 2).mean(), rel=1e-4)
    assert result["l0"] == pytest.approx((z != 0).sum(axis=1).mean(), rel=1e-4)
    np.testing.assert_allclose(load_file(str(run / "latent_freq.safetensors"))["freq"], fired,
                               atol=1 / len(x))
