"""SAE architectures: shapes, losses, statistics, and the SAELens export with scaling folded in."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import PipelineError
from pipeline.sae import REGISTRY, SAEConfig, build_sae
from pipeline.sae.gated import binary_entropy
from pipeline.sae.io import load_saelens, save_saelens

D, S = 16, 64


def make(arch: str, **kw):
    return build_sae(SAEConfig(arch=arch, d_in=D, d_sae=S, k=4, **kw),
                     generator=torch.Generator().manual_seed(0))


def train_a_little(sae, x, steps=5):
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for s in range(steps):
        loss, _, _, _ = sae.loss(x, torch.tensor(1.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.normalize_decoder()
        sae.refresh(s + 1)
    return sae


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_export_applied_to_raw_activations_matches_the_trained_sae(arch, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, D) * 7.0
    scale = 0.37
    sae = train_a_little(make(arch), x * scale)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(S), atol=1e-5)
    hashes = save_saelens(tmp_path, sae, scale, {"hook_name": "blocks.3.hook_resid_post",
                                                 "model_name": "m"})
    assert set(hashes) == {"sae_weights.safetensors", "cfg.json"}
    loaded = load_saelens(tmp_path)
    with torch.no_grad():
        z = sae.encode(x * scale)
        torch.testing.assert_close(loaded.encode(x), z, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded(x), sae.decode(z) / scale, rtol=1e-4, atol=1e-4)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "metadata"):
        assert key in cfg
    assert cfg["normalize_activations"] == "none"
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    expected = {"relu": "standard", "masked": "standard", "gated": "standard", "topk": "topk",
                "batchtopk": "jumprelu"}[arch]
    assert cfg["architecture"] == expected
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    want = {"W_enc": (D, S), "W_dec": (S, D), "b_enc": (S,), "b_dec": (D,)}
    if expected == "jumprelu":
        want["threshold"] = (S,)
    assert shapes == want


def test_topk_keeps_k_per_row_and_batchtopk_k_times_batch():
    x = torch.randn(32, D)
    _, _, _, z = make("topk").loss(x, torch.tensor(1.0))
    assert torch.all((z != 0).sum(-1) == 4)
    sae = make("batchtopk")
    _, _, _, z = sae.loss(x, torch.tensor(1.0))
    assert int((z != 0).sum()) == 4 * 32
    assert float(sae.threshold) > 0


def test_auxk_is_zero_without_dead_latents_and_positive_with_them():
    x = torch.randn(32, D)
    sae = make("topk", dead_tokens=10**9)
    _, parts, _, _ = sae.loss(x, torch.tensor(1.0))
    assert float(parts["aux"]) == 0.0
    sae = make("topk", dead_tokens=16)
    sae.loss(x, torch.tensor(1.0))  # 32 tokens pass: latents that did not fire are now dead
    assert sae.dead_mask().any()
    _, parts, _, _ = sae.loss(x, torch.tensor(1.0))
    assert float(parts["aux"]) > 0


def test_masked_statistics_come_from_z_not_x_hat():
    sae = make("masked", mask_momentum=0.5)
    x = torch.randn(32, D)
    _, _, x_hat, z = sae.loss(x, torch.tensor(1.0))
    expected = 0.5 * torch.ones(S) + 0.5 * z.abs().mean(0)
    torch.testing.assert_close(sae.ema, expected.detach())
    assert sae.ema.shape != x_hat.shape[1:]


def test_masked_mask_refreshes_only_every_n_steps():
    sae = make("masked", mask_every=3, mask_eps=0.5)
    sae.ema.fill_(0.1)
    sae.refresh(1)
    sae.refresh(2)
    assert float(sae.mask_density()) == 0.0
    sae.refresh(3)
    assert float(sae.mask_density()) == 1.0


@pytest.mark.parametrize(("penalty", "direction"), [("shrink", -1), ("restore", +1)])
def test_penalty_direction(penalty, direction):
    sae = make("masked", penalty=penalty, absorption=1.0, l1=0.0)
    sae.mask.fill_(1.0)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)  # norms 0.5: shrink pushes them down, restore back up to 1
    _, parts, _, _ = sae.loss(torch.randn(8, D), torch.tensor(1.0))
    (grad,) = torch.autograd.grad(parts["penalty"], sae.W_dec)
    radial = (grad * sae.W_dec).sum(-1)  # d(loss)/d(norm) direction per row
    # gradient descent moves along -grad: the norm grows where radial < 0
    assert torch.all(torch.sign(-radial) == direction)


def test_penalty_off_has_no_term():
    _, parts, _, _ = make("masked", penalty="off").loss(torch.randn(8, D), torch.tensor(1.0))
    assert "penalty" not in parts


def test_gated_entropy_term_and_gate_initialisation():
    sae = make("gated", gate_reg=1.0, l1=0.0)
    assert torch.allclose(sae.gates(), torch.sigmoid(torch.tensor(2.0)).expand(S))
    _, parts, _, _ = sae.loss(torch.randn(8, D), torch.tensor(1.0))
    p = torch.sigmoid(torch.tensor(2.0))
    assert torch.isclose(parts["gate_entropy"], -(p * p.log() + (1 - p) * (1 - p).log()))
    assert float(binary_entropy(torch.tensor(0.5))) == pytest.approx(0.6931, abs=1e-4)


def test_dead_mask_counts_tokens_without_firing():
    sae = make("relu", dead_tokens=64)
    with torch.no_grad():
        sae.b_enc[:8] = -1e6  # latents 0-7 can never fire
    for _ in range(2):
        sae.loss(torch.randn(32, D), torch.tensor(1.0))
    dead = sae.dead_mask()
    assert dead[:8].all() and float(sae.tokens_since_fired[0]) == 64


def test_l1_scale_scales_the_sparsity_term():
    sae = make("relu")
    x = torch.randn(8, D)
    _, a, _, _ = sae.loss(x, torch.tensor(1.0))
    _, b, _, _ = sae.loss(x, torch.tensor(0.25))
    assert torch.isclose(b["sparsity"], 0.25 * a["sparsity"])


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="k must be"):
        SAEConfig(arch="topk", d_in=4, d_sae=8, k=9)
    with pytest.raises(ValueError, match="unknown penalty"):
        SAEConfig(arch="masked", d_in=4, d_sae=8, penalty="up")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_sae(SAEConfig(arch="nope", d_in=4, d_sae=8))


def test_load_saelens_errors(tmp_path):
    with pytest.raises(PipelineError, match=r"cfg\.json is missing"):
        load_saelens(tmp_path)
    save_saelens(tmp_path, make("relu"), 1.0, {"hook_name": "h"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = 99
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match="W_enc has shape"):
        load_saelens(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_loss_is_capturable_in_a_cuda_graph(arch):
    sae = make(arch).cuda()
    x = torch.randn(64, D, device="cuda")
    scale = torch.ones((), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sae.loss(x, scale)[0].backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sae.loss(x, scale)[0].backward()
    g.replay()
    torch.cuda.synchronize()
