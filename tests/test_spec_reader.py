"""cache_schema/SPEC.md is enough to read a cache: a reader built from json, hashlib, numpy and zarr
alone (no cache_schema, no pipeline) finds every byte where the spec says it is."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import zarr

# ---------------------------------------------------------------------------------------------
# The reader: written from SPEC.md only.

NOT_HASHED = ("model_name", "corpus_source", "status", "norm_stats", "chunks_digest",
              "cache_id")
TOKEN_DTYPES = {"tokens": "<i4", "masked_tokens": "<i4", "is_masked": "|b1", "seq": "<i4"}
ACT_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spec_manifest(root: Path) -> dict:
    meta = json.loads((root / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    m = meta["attributes"]["manifest"]
    assert m["schema_version"] == 1
    assert m["status"] == "complete"
    identity = {k: v for k, v in m.items() if k not in NOT_HASHED}
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    assert hashlib.sha256(blob).hexdigest()[:16] == m["cache_id"]
    return m


def spec_arrays(m: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    n = m["n_sequences"] * m["context_length"]
    arrays = {name: ((n,), dt) for name, dt in TOKEN_DTYPES.items()}
    for layer in m["layers"]:
        for stream in ("clean", "masked"):
            arrays[f"{stream}/blocks.{layer}.hook_resid_post"] = (
                (n, m["d_model"]), ACT_DTYPES[m["storage_dtype"]])
    return arrays


def spec_chunk_file(root: Path, array: str, ndim: int, k: int) -> Path:
    return root.joinpath(array, "c", str(k), *(["0"] * (ndim - 1)))


def decode(raw: np.ndarray, storage_dtype: str) -> np.ndarray:
    if storage_dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def read_cache_by_spec(root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Manifest and every array, read chunk file by chunk file with np.fromfile, checked on the way."""
    m = spec_manifest(root)
    L, R = m["context_length"], m["rows_per_chunk"]
    n = m["n_sequences"] * L
    assert n % R == 0 and R % L == 0
    n_chunks = n // R
    assert m["codec"] == "none"  # plain file reads need uncompressed chunks
    group = zarr.open_group(str(root), mode="r")
    out: dict[str, list[np.ndarray]] = {}
    record_bytes = b""
    for k in range(n_chunks):
        rec_path = root / "_chunks" / f"{k:08d}.json"
        assert rec_path.is_file(), f"chunk {k} has no record"
        record_bytes += rec_path.read_bytes()
        record = json.loads(rec_path.read_text())
        assert record["chunk"] == k
        for name, (shape, dt) in spec_arrays(m).items():
            meta = json.loads((root / name / "zarr.json").read_text())
            assert meta["node_type"] == "array" and list(meta["shape"]) == list(shape)
            assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [R, *shape[1:]]
            assert meta["chunk_key_encoding"] == {"name": "default",
                                                  "configuration": {"separator": "/"}}
            assert [c["name"] for c in meta["codecs"]] == ["bytes"]
            path = spec_chunk_file(root, name, len(shape), k)
            assert path.stat().st_size == R * math.prod(shape[1:]) * np.dtype(dt).itemsize
            assert sha256_file(path) == record["checksums"][name], f"chunk {k}: {name}"
            values = np.fromfile(path, dtype=dt).reshape(R, *shape[1:])
            via_zarr = group[name][k * R:(k + 1) * R]
            assert via_zarr.dtype == np.dtype(dt) and via_zarr.shape == values.shape
            np.testing.assert_array_equal(values, via_zarr)
            out.setdefault(name, []).append(values)
        assert set(record["checksums"]) == set(spec_arrays(m))
    assert hashlib.sha256(record_bytes).hexdigest() == m["chunks_digest"]
    return m, {name: np.concatenate(parts) for name, parts in out.items()}


def check_rows(m: dict, a: dict[str, np.ndarray]) -> None:
    """Row r is position r % L of sequence r // L; BOS first; masked_tokens where not masked."""
    L = m["context_length"]
    n = m["n_sequences"] * L
    rows = np.arange(n)
    np.testing.assert_array_equal(a["seq"], rows // L)
    tokens, masked, is_masked = a["tokens"], a["masked_tokens"], a["is_masked"]
    pos0 = rows % L == 0
    assert (tokens[pos0] == m["bos_token_id"]).all()
    assert not is_masked[pos0].any()
    assert not is_masked[np.isin(tokens, m["special_token_ids"])].any()
    np.testing.assert_array_equal(masked[~is_masked], tokens[~is_masked])
    if m["mask_strategy"] == "mask-token":
        assert (masked[is_masked] == m["mask_token_id"]).all()
    # corpus_fingerprint = sha256 of the packed int32 tokens = concatenated tokens chunk files
    assert hashlib.sha256(tokens.astype("<i4").tobytes()).hexdigest() == m["corpus_fingerprint"]


def check_norm_stats(root: Path, m: dict, a: dict[str, np.ndarray], rtol: float) -> None:
    special = np.isin(a["tokens"], m["special_token_ids"])  # by the clean token, both streams
    n_chunks = m["n_sequences"] * m["context_length"] // m["rows_per_chunk"]
    records = [json.loads((root / "_chunks" / f"{k:08d}.json").read_text())
               for k in range(n_chunks)]
    for layer in m["layers"]:
        hook = f"blocks.{layer}.hook_resid_post"
        for stream in ("clean", "masked"):
            x = decode(a[f"{stream}/{hook}"], m["storage_dtype"])
            assert x.shape == (len(special), m["d_model"])
            norms = np.linalg.norm(x.astype(np.float64), axis=1)
            st = m["norm_stats"][hook][stream]
            assert st["count"] == int((~special).sum())
            assert st["special_count"] == int(special.sum())
            np.testing.assert_allclose(st["mean_norm"], norms[~special].mean(), rtol=rtol)
            np.testing.assert_allclose(st["max_norm"], norms[~special].max(), rtol=rtol)
            np.testing.assert_allclose(st["special_mean_norm"], norms[special].mean(), rtol=rtol)
            # the manifest's statistics are the SPEC §6 aggregation of the chunk records
            s = [r["stats"][hook][stream] for r in records]
            count, total = sum(r["count"] for r in s), sum(r["sum"] for r in s)
            sumsq = sum(r["sumsq"] for r in s)
            assert math.isclose(st["mean_norm"], total / count, rel_tol=1e-12)
            assert math.isclose(st["rms_norm"], math.sqrt(sumsq / count), rel_tol=1e-12)
            assert math.isclose(
                st["std_norm"], math.sqrt(max(sumsq / count - (total / count) ** 2, 0.0)),
                rel_tol=1e-9)
            assert st["max_norm"] == max(r["max"] for r in s)
            # normalisation: scale = sqrt(d_model) / mean_norm gives E||x|| = sqrt(d_model)
            scale = math.sqrt(m["d_model"]) / st["mean_norm"]
            np.testing.assert_allclose((norms[~special] * scale).mean(), math.sqrt(m["d_model"]),
                                       rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Tests


def test_spec_reader_reads_float32_cache_without_our_code(tiny_cache):
    root = Path(tiny_cache)
    m, a = read_cache_by_spec(root)
    assert m["storage_dtype"] == "float32" and m["layers"] == [1, 2] and m["d_model"] == 64
    assert m["context_length"] == 32 and m["rows_per_chunk"] == 256
    assert len(a["tokens"]) == 1024 and a["clean/blocks.1.hook_resid_post"].dtype == np.float32
    check_rows(m, a)
    check_norm_stats(root, m, a, rtol=1e-4)

    # SPEC §3 masking, reproduced from the manifest alone
    L = m["context_length"]
    tokens = a["tokens"].reshape(-1, L)
    assert m["mask_strategy"] == "mask-token"
    for s in range(m["n_sequences"]):
        rng = np.random.default_rng([m["mask_seed"], s])
        mask = rng.random(L) < m["mask_rate"]
        mask &= ~np.isin(tokens[s], m["special_token_ids"])
        mask[0] = False
        np.testing.assert_array_equal(a["is_masked"].reshape(-1, L)[s], mask)
        np.testing.assert_array_equal(a["masked_tokens"].reshape(-1, L)[s],
                                      np.where(mask, m["mask_token_id"], tokens[s]))
    assert a["is_masked"].any()


def test_spec_reader_decodes_bfloat16_cache(tmp_path, tiny_model, corpus):
    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.run import extract

    out = tmp_path / "bf16"
    extract(ExtractConfig(out=str(out), model=str(tiny_model), corpus=str(corpus), layers=[1],
                          tokens=1024, context_length=32, rows_per_chunk=256, batch_size=4,
                          mask_rate=0.3, device="cpu", dtype="bfloat16"), progress=False)

    m, a = read_cache_by_spec(out)
    assert m["storage_dtype"] == "bfloat16"
    raw = a["clean/blocks.1.hook_resid_post"]
    assert raw.dtype == np.uint16 and raw.shape == (1024, 64)
    group = zarr.open_group(str(out), mode="r")
    assert group["clean/blocks.1.hook_resid_post"].dtype == np.uint16
    x = decode(raw, "bfloat16")
    assert x.dtype == np.float32 and np.isfinite(x).all() and np.abs(x).max() > 0
    # decoded values are exactly bfloat16: the low 16 bits of the float32 pattern are zero
    assert not (x.view(np.uint32) & 0xFFFF).any()
    check_rows(m, a)
    # norm stats come from the activations before the cast to bfloat16 (SPEC §6), so norms of the
    # stored values agree only to bfloat16 precision
    check_norm_stats(out, m, a, rtol=1e-3)


def test_hook_names_match_hf_hidden_states(tiny_cache, tiny_model, corpus, tmp_path):
    """SPEC §3: blocks.L.hook_resid_post == HF hidden_states[L + 1], but for the last layer,
    where HF's last hidden state has the final norm applied and the cache's has not."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.run import extract

    last = tmp_path / "last"
    extract(ExtractConfig(out=str(last), model=str(tiny_model), corpus=str(corpus), layers=[3],
                          tokens=256, context_length=32, rows_per_chunk=256, batch_size=4,
                          device="cpu"), progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    group = zarr.open_group(str(tiny_cache), mode="r")
    tokens = group["tokens"][:256].reshape(8, 32)
    with torch.inference_mode():
        hs = model(input_ids=torch.from_numpy(tokens).long(), output_hidden_states=True).hidden_states
        for layer in (1, 2):
            got = group[f"clean/blocks.{layer}.hook_resid_post"][:256].reshape(8, 32, 64)
            np.testing.assert_allclose(got, hs[layer + 1].numpy(), rtol=1e-5, atol=1e-5)
        got = zarr.open_group(str(last), mode="r")["clean/blocks.3.hook_resid_post"][:256]
        got = torch.from_numpy(got.reshape(8, 32, 64))
        assert not np.allclose(got.numpy(), hs[4].numpy(), atol=1e-3)
        np.testing.assert_allclose(model.model.norm(got).numpy(), hs[4].numpy(),
                                   rtol=1e-5, atol=1e-5)
