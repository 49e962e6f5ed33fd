"""pipeline extract: activations match HF, masking, determinism, verification, resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cache_schema import (
    IS_MASKED,
    MASKED_TOKENS,
    SEQ,
    TOKENS,
    CacheError,
    activation_array,
    hook_name,
    open_cache,
    read_manifest,
    verify,
)
from pipeline.extract.config import ExtractConfig
from pipeline.extract.run import extract


def tiny_config(out, model, corpus, **kw) -> ExtractConfig:
    base = dict(out=str(out), model=str(model), corpus=str(corpus), layers=[1, 2], tokens=1024,
                context_length=32, rows_per_chunk=256, batch_size=4, mask_rate=0.3, device="cpu")
    return ExtractConfig(**{**base, **kw})


def read(cache: Path, name: str) -> np.ndarray:
    return zarr.open_array(str(cache / name), mode="r")[:]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".tmp")}


def hf_hidden_states(model_dir: Path, ids: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Independent reference: the full HF model with output_hidden_states, one sequence at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        outs = [model(torch.from_numpy(row[None]).long(), output_hidden_states=True).hidden_states
                for row in ids]
    return tuple(torch.cat([o[i] for o in outs]) for i in range(len(outs[0])))


def assert_matches_hf(cache: Path, model_dir: Path, atol: float) -> None:
    m = open_cache(cache)
    L = m.context_length
    for stream, ids_name in (("clean", TOKENS), ("masked", MASKED_TOKENS)):
        ids = read(cache, ids_name).reshape(-1, L)
        hs = hf_hidden_states(model_dir, ids)
        for layer in m.layers:
            ours = torch.from_numpy(read(cache, activation_array(stream, hook_name(layer))))
            ref = hs[layer + 1].reshape(-1, m.d_model)
            torch.testing.assert_close(ours, ref, atol=atol, rtol=1e-4)


def test_activations_equal_independent_hf_forward_tiny_llama(tiny_cache, tiny_model):
    assert_matches_hf(tiny_cache, tiny_model, atol=1e-5)


def test_cache_holds_tokens_masks_and_sequence_boundaries(tiny_cache):
    m = open_cache(tiny_cache)
    tokens, masked = read(tiny_cache, TOKENS), read(tiny_cache, MASKED_TOKENS)
    is_masked, seq = read(tiny_cache, IS_MASKED), read(tiny_cache, SEQ)
    L = m.context_length
    assert tokens.shape == masked.shape == is_masked.shape == seq.shape == (m.n_tokens,)
    np.testing.assert_array_equal(seq, np.arange(m.n_tokens) // L)
    assert (tokens[::L] == m.bos_token_id).all()
    assert not is_masked[::L].any(), "BOS must never be masked"
    np.testing.assert_array_equal(masked[~is_masked], tokens[~is_masked])
    assert (masked[is_masked] == m.mask_token_id).all()
    assert not np.isin(tokens[is_masked], m.special_token_ids).any()


def test_clean_and_masked_agree_before_first_mask_and_differ_after(tiny_cache):
    m = open_cache(tiny_cache)
    L = m.context_length
    is_masked = read(tiny_cache, IS_MASKED).reshape(-1, L)
    for layer in m.layers:
        clean = read(tiny_cache, activation_array("clean", hook_name(layer))).reshape(-1, L, m.d_model)
        masked = read(tiny_cache, activation_array("masked", hook_name(layer))).reshape(
            -1, L, m.d_model)
        checked = 0
        for s in range(is_masked.shape[0]):
            hits = np.flatnonzero(is_masked[s])
            if not len(hits):
                continue
            first = hits[0]
            np.testing.assert_allclose(masked[s, :first], clean[s, :first], atol=1e-5)
            diff = np.linalg.norm(masked[s, first:] - clean[s, first:], axis=-1)
            assert (diff > 1e-3).all(), f"sequence {s}: masked equals clean after position {first}"
            checked += 1
        assert checked > 0


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_masked_fraction_matches_rate(tmp_path, tiny_model, corpus, rate):
    m = extract(tiny_config(tmp_path / "c", tiny_model, corpus, mask_rate=rate, layers=[0],
                            tokens=4096), progress=False)
    tokens, is_masked = read(tmp_path / "c", TOKENS), read(tmp_path / "c", IS_MASKED)
    eligible = ~np.isin(tokens, m.special_token_ids)
    n = eligible.sum()
    observed = is_masked[eligible].mean()
    assert abs(observed - rate) < 4 * np.sqrt(rate * (1 - rate) / n) + 1e-3, (observed, rate)


def test_random_token_strategy_draws_non_special_tokens(tmp_path, tiny_model, corpus):
    m = extract(tiny_config(tmp_path / "c", tiny_model, corpus, mask_strategy="random-token",
                            layers=[0]), progress=False)
    masked, is_masked = read(tmp_path / "c", MASKED_TOKENS), read(tmp_path / "c", IS_MASKED)
    replaced = masked[is_masked]
    assert len(replaced) > 50
    assert not np.isin(replaced, m.special_token_ids).any()
    assert len(np.unique(replaced)) > 20


def test_same_seed_gives_same_id_and_bytes_and_other_seed_differs(tmp_path, tiny_model, corpus):
    a = extract(tiny_config(tmp_path / "a", tiny_model, corpus), progress=False)
    b = extract(tiny_config(tmp_path / "b", tiny_model, corpus), progress=False)
    c = extract(tiny_config(tmp_path / "c", tiny_model, corpus, seed=1), progress=False)
    assert a.cache_id == b.cache_id != c.cache_id
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert not np.array_equal(read(tmp_path / "a", IS_MASKED), read(tmp_path / "c", IS_MASKED))
    hook = activation_array("masked", hook_name(1))
    assert not np.array_equal(read(tmp_path / "a", hook), read(tmp_path / "c", hook))
    np.testing.assert_array_equal(read(tmp_path / "a", activation_array("clean", hook_name(1))),
                                  read(tmp_path / "c", activation_array("clean", hook_name(1))))


@pytest.mark.parametrize("dtype,atol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_storage_round_trips_close_to_float32(tmp_path, tiny_cache, tiny_model, corpus,
                                                   dtype, atol):
    extract(tiny_config(tmp_path / "h", tiny_model, corpus, dtype=dtype), progress=False)
    name = activation_array("clean", hook_name(2))
    raw = read(tmp_path / "h", name)
    if dtype == "bfloat16":
        assert raw.dtype == np.uint16
        half = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        assert raw.dtype == np.float16
        half = raw.astype(np.float32)
    ref = read(tiny_cache, name)
    scale = np.abs(ref).max()
    assert np.abs(half - ref).max() <= atol * scale


def test_zstd_codec_gives_the_same_values(tmp_path, tiny_cache, tiny_model, corpus):
    extract(tiny_config(tmp_path / "z", tiny_model, corpus, codec="zstd"), progress=False)
    name = activation_array("masked", hook_name(1))
    np.testing.assert_array_equal(read(tmp_path / "z", name), read(tiny_cache, name))
    assert verify(tmp_path / "z")[1] == []


def test_norm_stats_leave_out_special_tokens(tiny_cache):
    m = open_cache(tiny_cache)
    tokens = read(tiny_cache, TOKENS)
    special = np.isin(tokens, m.special_token_ids)
    for hook in m.hooks:
        for stream in ("clean", "masked"):
            s = m.norm_stats[hook][stream]
            assert s["count"] == (~special).sum() and s["special_count"] == special.sum()
            norms = np.linalg.norm(read(tiny_cache, activation_array(stream, hook)), axis=1)
            assert s["mean_norm"] == pytest.approx(norms[~special].mean(), rel=1e-5)
            assert s["special_mean_norm"] == pytest.approx(norms[special].mean(), rel=1e-5)


def test_flipped_byte_fails_verify_naming_the_chunk(tmp_path, tiny_cache):
    from typer.testing import CliRunner

    from pipeline.cli import app

    cache = tmp_path / "copy"
    shutil.copytree(tiny_cache, cache)
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(cache)])
    assert ok.exit_code == 0, ok.output
    target = cache / "clean" / hook_name(2) / "c" / "2" / "0"
    data = bytearray(target.read_bytes())
    data[1234] ^= 0x40
    target.write_bytes(bytes(data))
    bad = runner.invoke(app, ["verify", str(cache)])
    assert bad.exit_code == 1
    assert f"chunk 2: clean/{hook_name(2)} checksum mismatch" in bad.output
    assert "chunk 0" not in bad.output and "chunk 1:" not in bad.output


def test_readers_refuse_an_incomplete_cache(tmp_path, tiny_cache):
    cache = tmp_path / "partial"
    shutil.copytree(tiny_cache, cache)
    m = read_manifest(cache)
    m.status, m.norm_stats, m.chunks_digest = "writing", {}, None
    from cache_schema import write_manifest

    write_manifest(cache, m)
    (cache / "_chunks" / "00000003.json").unlink()
    with pytest.raises(CacheError, match=r"not complete.*3/4 chunks.*re-running"):
        open_cache(cache)


def test_resume_after_lost_chunks_gives_identical_bytes(tmp_path, tiny_cache, tiny_model, corpus):
    """A crash after chunk 1: records of chunks 2-3 gone, chunk 2's data half written."""
    cache = tmp_path / "resumed"
    shutil.copytree(tiny_cache, cache)
    m = read_manifest(cache)
    m.status, m.norm_stats, m.chunks_digest = "writing", {}, None
    from cache_schema import write_manifest

    write_manifest(cache, m)
    for k in (2, 3):
        (cache / "_chunks" / f"{k:08d}.json").unlink()
    part = cache / "masked" / hook_name(1) / "c" / "2" / "0"
    part.write_bytes(part.read_bytes()[:1000])
    (cache / "tokens" / "c" / "3").unlink()
    # what a kill -9 inside a write leaves: zarr's temporary chunk file and ours
    (cache / "tokens" / "c" / "3.0f1e2d3c4b5a69788796a5b4c3d2e1f0.partial").write_bytes(b"x")
    (cache / "_chunks" / "00000002.json.tmp").write_bytes(b"{")
    extract(tiny_config(cache, tiny_model, corpus), progress=False)
    assert tree_bytes(cache) == tree_bytes(tiny_cache)


def test_model_is_truncated_after_the_deepest_hooked_layer(tiny_model):
    from pipeline.models import decoder_layers, load_truncated, resolve_model

    base = load_truncated(resolve_model(str(tiny_model)), 2, torch.float32, "cpu")
    assert len(decoder_layers(base)) == 2
    assert not any("lm_head" in name for name, _ in base.named_parameters())


def test_cache_id_depends_on_content_not_on_paths(tmp_path, tiny_model, corpus):
    shutil.copytree(corpus, tmp_path / "moved_corpus")
    shutil.copytree(tiny_model, tmp_path / "moved_model")
    a = extract(tiny_config(tmp_path / "a", tiny_model, corpus, layers=[0]), progress=False)
    b = extract(tiny_config(tmp_path / "b", tmp_path / "moved_model", tmp_path / "moved_corpus",
                            layers=[0]), progress=False)
    assert a.cache_id == b.cache_id
    (tmp_path / "moved_corpus" / "doc000.txt").write_text("A different first document. " * 50)
    c = extract(tiny_config(tmp_path / "c", tmp_path / "moved_model", tmp_path / "moved_corpus",
                            layers=[0]), progress=False)
    assert c.cache_id != a.cache_id


def test_model_fingerprint_sees_weight_values_not_only_sizes(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    from pipeline.models import folder_fingerprint

    other = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    other.save_pretrained(tmp_path / "other")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / f, tmp_path / "other" / f)
    assert folder_fingerprint(tmp_path / "other") != folder_fingerprint(tiny_model)


def test_preparing_a_cache_creates_every_array_before_any_chunk(tmp_path, tiny_model, corpus):
    """With several extraction processes only the first prepares the cache; the others must find
    every array there (each creating what it found missing raced: one failed on the other's)."""
    from cache_schema import array_specs
    from pipeline.extract.run import plan, prepare_output

    m, *_ = plan(tiny_config(tmp_path / "c", tiny_model, corpus))
    for out in (tmp_path / "c", tmp_path / "killed_after_manifest"):
        if out.name.startswith("killed"):
            from cache_schema import write_manifest

            write_manifest(out, m)  # a run killed before it created the arrays
        assert prepare_output(out, m, overwrite=False) == []
        for name in array_specs(m):
            assert (out / name / "zarr.json").is_file(), f"{out.name}: {name} not created"
