"""pipeline features: a hand-built SAE whose latent i fires exactly on token t_i must show the
occurrences of t_i as its top examples (with the right context) and t_i's frequency; the site
renders in a real headless browser; bad inputs are refused with clear errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_schema import (
    IS_MASKED,
    MASKED_TOKENS,
    SEQ,
    TOKENS,
    Manifest,
    activation_array,
    chunk_stats,
    open_cache,
    write_manifest,
)
from cache_schema.write import finalize
from pipeline.cli import app
from pipeline.data.reader import ChunkReader
from pipeline.errors import PipelineError
from pipeline.extract.writer import ChunkWriter
from pipeline.features.collect import N_BINS, Histogram, TopExamples
from pipeline.features.config import FeaturesConfig
from pipeline.features.run import features, logit_effects, parse_latents
from pipeline.features.site import esc, index_page, visible
from pipeline.run import save_saelens
from pipeline.sae import build_sae, sae_config

D, LAYER, N_EX, CTX = 64, 1, 5, 3
D_SAE = 16


def token_cache(src: Path, dst: Path, marked: list[int]) -> Path:
    """A copy of the tiny model's cache (same manifest and token ids) whose activations depend
    only on the token and the row: row r of a chunk has x[j] = 1 + r/R where tokens[r] == marked[j]
    (distinct values: no ties), zero in the first D_SAE columns otherwise, noise in the rest."""
    m = open_cache(src)
    fields = {k: v for k, v in m.to_dict().items()
              if k not in ("status", "norm_stats", "chunks_digest", "cache_id")}
    new = Manifest(**fields)
    write_manifest(dst, new)
    reader, writer = ChunkReader(src, m), ChunkWriter(dst, new)
    rng = np.random.default_rng(0)
    R = m.rows_per_chunk
    for k in range(m.n_chunks):
        data = {}
        for name, dtype in ((TOKENS, np.int32), (MASKED_TOKENS, np.int32), (IS_MASKED, np.bool_),
                            (SEQ, np.int32)):
            data[name] = np.empty(R, dtype)
            reader.read(name, k, data[name])
        tokens = data[TOKENS]
        ramp = (np.arange(R) / R).astype(np.float32)
        x = np.zeros((R, m.d_model), np.float32)
        x[:, D_SAE:] = rng.normal(size=(R, m.d_model - D_SAE))
        for j, t in enumerate(marked):
            x[tokens == t, j] = 1.0 + ramp[tokens == t]
        norms = {}
        for hook in new.hooks:
            for stream in ("clean", "masked"):
                data[activation_array(stream, hook)] = x
            norms[hook] = {"clean": np.linalg.norm(x, axis=1), "masked": np.linalg.norm(x, axis=1)}
        writer.submit(k, data, chunk_stats(norms, np.isin(tokens, new.special_token_ids)))
    writer.close()
    finalize(dst, new)
    return dst


def one_hot_sae(folder: Path, cache: Path, n_marked: int, layer: int = LAYER, d_in: int = D,
                holdout: int | None = 1) -> Path:
    """Latent i < n_marked reads column i with threshold 0.5 (fires exactly on marked[i]);
    the other latents never fire."""
    sae = build_sae(sae_config(arch="relu", d_in=d_in, d_sae=D_SAE))
    torch.manual_seed(1)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:n_marked, :n_marked] = torch.eye(n_marked)
        sae.b_enc.fill_(-0.5)
        sae.W_dec.copy_(torch.randn(D_SAE, d_in))
        sae.b_dec.zero_()
    save_saelens(folder, sae, 1.0, {"hook_name": f"blocks.{layer}.hook_resid_post",
                                    "model_name": "tiny"})
    if holdout is not None:
        (folder / "train_config.json").write_text(json.dumps({"cache": str(cache),
                                                              "holdout_chunks": holdout}))
    return folder


def heldout_tokens(cache: Path) -> np.ndarray:
    m = open_cache(cache)
    out = np.empty(m.rows_per_chunk, np.int32)
    ChunkReader(cache, m).read(TOKENS, m.n_chunks - 1, out)
    return out


@pytest.fixture(scope="module")
def marked_site(tiny_cache, tiny_model, tmp_path_factory):
    """(cache, sae folder, marked tokens, features.json data, index.html)."""
    tokens = heldout_tokens(tiny_cache)
    m = open_cache(tiny_cache)
    ids, counts = np.unique(tokens[~np.isin(tokens, m.special_token_ids)], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    marked = [int(ids[order[0]]), int(ids[order[1]]), int(ids[order[5]]),
              int(ids[counts == 1][0])]  # frequent ones, fewer than N_EX occurrences, once
    root = tmp_path_factory.mktemp("features")
    cache = token_cache(tiny_cache, root / "cache", marked)
    sae_dir = one_hot_sae(root / "sae", cache, len(marked))
    index = features(FeaturesConfig(sae_dir, latents="0-7", examples=N_EX, context=CTX, model=str(tiny_model),
                     device="cpu", progress=False))
    data = json.loads((index.parent / "features.json").read_text())
    return cache, sae_dir, marked, data, index


def test_latent_i_shows_the_occurrences_of_its_token(marked_site, tiny_model):
    from transformers import AutoTokenizer

    cache, _, marked, data, index = marked_site
    tok = AutoTokenizer.from_pretrained(tiny_model)
    m = open_cache(cache)
    tokens = heldout_tokens(cache)
    first = (m.n_chunks - 1) * m.rows_per_chunk
    L = m.context_length
    regular = ~np.isin(tokens, m.special_token_ids)
    assert data["holdout_chunks"] == [m.n_chunks - 1]
    assert data["tokens_scanned"] == int(regular.sum())
    assert [f["index"] for f in data["latents"]] == list(range(8))
    for i, t in enumerate(marked):
        f = data["latents"][i]
        where = np.flatnonzero(tokens == t)
        assert f["fired"] == len(where)
        assert f["frequency"] == pytest.approx(len(where) / regular.sum())
        assert sum(f["histogram"]["counts"]) == len(where)
        # the largest activations are the latest rows (z = 1 + r/R - 0.5)
        R = m.rows_per_chunk
        expected = where[::-1][:N_EX]
        assert len(f["examples"]) == min(N_EX, len(where))
        assert f["max_activation"] == pytest.approx(0.5 + where.max() / R)
        for ex, r in zip(f["examples"], expected, strict=True):
            assert ex["activation"] == pytest.approx(0.5 + r / R)
            assert ex["row"] == first + r and ex["position"] == r % L
            lo, hi = max(r - CTX, r - r % L), min(r + CTX, r - r % L + L - 1)
            assert ex["token_ids"] == tokens[lo:hi + 1].tolist()
            assert ex["token_ids"][ex["center"]] == t
            assert ex["text"] == [tok.decode([int(j)]) for j in tokens[lo:hi + 1]]
            want = [0.5 + q / R if tokens[q] == t else 0.0 for q in range(lo, hi + 1)]
            assert ex["activations"] == pytest.approx(want, abs=1e-4)
    for f in data["latents"][len(marked):]:  # never fire
        assert f["fired"] == 0 and f["examples"] == [] and f["max_activation"] == 0
    assert index.is_file() and len(list((index.parent / "latents").glob("*.html"))) == 8


def logits_of(lm, w_dec):
    """SAE-Vis's logit effects computed by hand: decoder rows * final norm weight @ W_U^T."""
    with torch.no_grad():
        return (w_dec * lm.model.norm.weight) @ lm.lm_head.weight.T


def test_logit_effects_are_the_decoder_rows_through_the_unembedding(marked_site, tiny_model):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, sae_dir, _, data, _ = marked_site
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    w_dec = load_file(str(sae_dir / "sae_weights.safetensors"))["W_dec"]
    logits = logits_of(lm, w_dec)
    for f in data["latents"]:
        top = logits[f["index"]].topk(10)
        assert [p["id"] for p in f["promoted"]] == top.indices.tolist()
        assert [p["logit"] for p in f["promoted"]] == pytest.approx(top.values.tolist(), rel=1e-4)
        bottom = logits[f["index"]].topk(10, largest=False).indices.tolist()
        assert [p["id"] for p in f["suppressed"]] == bottom
    # the tiny model's final norm weight is all ones: check that it is applied with a random one
    with torch.no_grad():
        lm.model.norm.weight.uniform_(0.1, 3.0)
    up_v, up_i, down_v, down_i = logit_effects(lm, w_dec)
    assert torch.allclose(up_v, logits_of(lm, w_dec).topk(10).values, rtol=1e-4)
    logits = logits_of(lm, w_dec)
    assert torch.equal(up_i, logits.topk(10).indices)
    assert torch.equal(down_i, logits.topk(10, largest=False).indices)
    assert torch.allclose(down_v, logits.topk(10, largest=False).values, rtol=1e-4)


def test_top_examples_and_histogram_match_brute_force():
    torch.manual_seed(0)
    L, n, m = 8, 4, 2
    top, hist = TopExamples(3, n, m), Histogram(3)
    blocks = [torch.relu(torch.randn(32, 3)) * s for s in (1.0, 5.0, 0.5)]  # max grows: rebin
    for b, z in enumerate(blocks):
        top.add(z, torch.arange(32, dtype=torch.int32) + 100 * b, 32 * b, L)
        hist.add(z)
    z = torch.cat(blocks)
    vals, rows = z.topk(n, dim=0)
    assert torch.equal(top.values, vals.T) and torch.equal(top.rows, rows.T)
    for lat in range(3):
        r = int(top.rows[lat, 0])
        start = r - r % L
        local = r - 32 * (r // 32)
        want = [100 * (r // 32) + local + d if start <= r + d < start + L else -1
                for d in range(-m, m + 1)]
        assert top.context[lat, 0].tolist() == want
        w = float(hist.width[lat])
        nz = z[:, lat][z[:, lat] > 0].double()
        assert nz.max() <= N_BINS * w
        expected = torch.bincount(torch.floor(nz / w).long().clamp(max=N_BINS - 1),
                                  minlength=N_BINS)
        assert torch.equal(hist.counts[lat], expected)


def test_token_text_is_escaped_and_whitespace_visible():
    assert esc('<b a="x">&') == "&lt;b a=&quot;x&quot;&gt;&amp;"
    assert visible("\n") == "\u21b5" and visible("  ") == "\u00b7\u00b7"
    assert visible(" the") == " the" and visible(" the", spaces=True) == "\u00b7the"
    data = {"hook": "h", "sae": "s", "cache": "c", "cache_id": "x", "holdout_chunks": [1],
            "tokens_scanned": 1, "d_sae": 1,
            "latents": [{"index": 0, "frequency": 0.5, "max_activation": 1.0,
                         "label": "<script>alert(1)</script>"}]}
    page = index_page(data)
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_parse_latents():
    assert parse_latents(None, 2304) == list(range(512))
    assert parse_latents(None, 100) == list(range(100))
    assert parse_latents("3, 1,5-7", 10) == [1, 3, 5, 6, 7]
    with pytest.raises(PipelineError, match=r"latent 10 is out of range.*10 latents"):
        parse_latents("0-10", 10)
    with pytest.raises(PipelineError, match="cannot read latents"):
        parse_latents("x", 10)


def test_bad_inputs_are_refused(marked_site, tiny_model, tmp_path):
    cache, sae_dir, _, _, _ = marked_site
    with pytest.raises(PipelineError, match=r"reads blocks\.3\.hook_resid_post.*holds"):
        features(FeaturesConfig(one_hot_sae(tmp_path / "a", cache, 2, layer=3), progress=False))
    with pytest.raises(PipelineError, match=r"d_in is 32.*d_model 64"):
        features(FeaturesConfig(one_hot_sae(tmp_path / "b", cache, 2, d_in=32), progress=False))
    with pytest.raises(PipelineError, match=r"no held-out chunks.*--holdout-chunks"):
        features(FeaturesConfig(one_hot_sae(tmp_path / "c", cache, 2, holdout=0), cache=str(cache),
                 progress=False))
    with pytest.raises(PipelineError, match="latent 16 is out of range"):
        features(FeaturesConfig(sae_dir, latents="16", model=str(tiny_model), progress=False))
    no_tokens = tmp_path / "no_tokens"
    shutil.copytree(cache, no_tokens)
    shutil.rmtree(no_tokens / TOKENS)
    with pytest.raises(PipelineError, match="has no token ids"):
        features(FeaturesConfig(sae_dir, cache=str(no_tokens), model=str(tiny_model), progress=False))
    result = CliRunner().invoke(app, ["features", str(sae_dir), "--latents", "99",
                                      "--model", str(tiny_model)])
    assert result.exit_code == 2 and "latent 99 is out of range" in result.output


def test_cli_writes_the_site_and_prints_its_path(marked_site, tiny_model, tmp_path):
    _, sae_dir, _, _, _ = marked_site
    result = CliRunner().invoke(app, ["features", str(sae_dir), "--latents", "0,2",
                                      "--examples", "2", "--context", "1", "--out",
                                      str(tmp_path / "site"), "--model", str(tiny_model),
                                      "--tokens", "64", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    index = tmp_path / "site" / "index.html"
    assert str(index.resolve()) in result.output
    data = json.loads((tmp_path / "site" / "features.json").read_text())
    assert [f["index"] for f in data["latents"]] == [0, 2]
    assert data["tokens_scanned"] <= 64 and all(len(f["examples"]) <= 2 for f in data["latents"])


# -- rendering in a real browser ------------------------------------------------------------------
def browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def run_browser(*args: str) -> str:
    exe = browser()
    if exe is None:
        pytest.skip("no chromium / google-chrome on PATH")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def png_colors(path: Path) -> int:
    """Distinct pixel colours of a PNG (PIL if installed, else a minimal 8-bit RGB(A) decoder)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return len(set(im.convert("RGB").getdata()))
    except ImportError:
        pass
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    i, idat, (w, h, depth, ctype) = 8, b"", (0, 0, 0, 0)
    while i < len(raw):
        n, kind = int.from_bytes(raw[i:i + 4], "big"), raw[i + 4:i + 8]
        body = raw[i + 8:i + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = (int.from_bytes(body[0:4], "big"), int.from_bytes(body[4:8], "big"),
                                  body[8], body[9])
        elif kind == b"IDAT":
            idat += body
        i += 12 + n
    assert depth == 8 and ctype in (2, 6), "minimal decoder: 8-bit RGB/RGBA only"
    bpp = 3 if ctype == 2 else 4
    data, stride = zlib.decompress(idat), w * bpp
    prev, colors = bytearray(stride), set()
    for y in range(h):
        kind, line = data[y * (stride + 1)], bytearray(data[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):  # undo the PNG filters (None, Sub, Up, Average, Paeth)
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            p = a + b - c
            pred = (0, a, b, (a + b) // 2,
                    a if abs(p - a) <= min(abs(p - b), abs(p - c)) else b if abs(p - b) <= abs(p - c)
                    else c)[kind]
            line[x] = (line[x] + pred) & 0xFF
        colors.update(bytes(line[x:x + 3]) for x in range(0, stride, bpp))
        prev = line
    return len(colors)


@pytest.mark.slow
def test_the_site_renders_in_a_headless_browser(marked_site, tmp_path):
    _, _, _, data, index = marked_site
    url = index.resolve().as_uri()
    dom = run_browser("--dump-dom", url)
    assert dom.count("<tr>") == 1 + len(data["latents"])  # header + one row per latent
    assert 'href="latents/0.html"' in dom
    # the table sorts: two clicks on the frequency header put the most frequent latent first
    clicks = "<script>for(let i=0;i<2;i++)document.querySelectorAll('th')[1].click();</script>"
    sorted_page = tmp_path / "sorted.html"
    sorted_page.write_text(index.read_text().replace("</body>", clicks + "</body>"))
    dom = run_browser("--dump-dom", sorted_page.resolve().as_uri())
    first = int(re.search(r'href="latents/(\d+)\.html"', dom[dom.index("<tbody>"):]).group(1))
    freq = {f["index"]: f["frequency"] for f in data["latents"]}
    assert freq[first] == max(freq.values()) > min(freq.values())
    shot = tmp_path / "index.png"
    run_browser(f"--screenshot={shot}", "--window-size=1000,700", url)
    assert shot.is_file() and png_colors(shot) > 1
    latent = index.parent / "latents" / "0.html"
    dom = run_browser("--dump-dom", latent.resolve().as_uri())
    assert dom.count('class="ex"') == len(data["latents"][0]["examples"]) > 0
    assert "<svg" in dom and "Promoted tokens" in dom
    shot = tmp_path / "latent.png"
    run_browser(f"--screenshot={shot}", "--window-size=1000,900", latent.resolve().as_uri())
    assert png_colors(shot) > 1
