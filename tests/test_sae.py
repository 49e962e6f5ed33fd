"""SAE architectures: shapes, losses, statistics, and the SAELens export with scaling folded in."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from pipeline.errors import PipelineError
from pipeline.run import load_saelens, save_saelens
from pipeline.sae import ARCHITECTURES, build_sae, sae_config
from pipeline.sae.gated import binary_entropy
from pipeline.sae.sparse import SparseCode

D, S = 16, 64
ARCHS = sorted(ARCHITECTURES)
ONE = torch.tensor(1.0)
META = {"hook_name": "blocks.3.hook_resid_post", "model_name": "m", "context_size": 128}


def make(arch: str, seed: int = 0, **kw):
    return build_sae(sae_config(arch=arch, d_in=D, d_sae=S, k=4, **kw),
                     generator=torch.Generator().manual_seed(seed))


def train_a_little(sae, x, steps=5):
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for s in range(steps):
        loss, _, _, _ = sae.loss(x, ONE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.normalize_decoder()
        sae.refresh(s + 1)
    return sae


# -- every architecture ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_parts_and_gradients(arch):
    sae = make(arch)
    x = torch.randn(32, D)
    assert sae.encode(x).shape == (32, S) and sae.decode(sae.encode(x)).shape == (32, D)
    loss, parts, x_hat, z = sae.loss(x, ONE)
    z = z.dense() if isinstance(z, SparseCode) else z  # topk, batchtopk: the k-sparse step
    assert x_hat.shape == (32, D) and z.shape == (32, S) and loss.dim() == 0
    assert "mse" in parts and all(v.dim() == 0 for v in parts.values())
    torch.testing.assert_close(loss, sum(parts.values()))
    loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.dtype == torch.float32
    assert sae.W_dec.grad.abs().sum() > 0 and sae.W_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_normalize_decoder_gives_unit_rows(arch):
    sae = make(arch)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(S, 1) * 5 + 0.01)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(S))


@pytest.mark.parametrize("arch", ARCHS)
def test_initialisation_is_tied_unit_norm_and_deterministic(arch):
    a, b, c = make(arch, seed=1), make(arch, seed=1), make(arch, seed=2)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name
    assert not torch.equal(a.W_dec, c.W_dec)
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.ones(S))
    assert torch.equal(a.W_enc, a.W_dec.t()) and not a.b_enc.any() and not a.b_dec.any()


@pytest.mark.parametrize("arch", ARCHS)
def test_export_applied_to_raw_activations_matches_the_trained_sae(arch, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, D) * 7.0
    scale = 0.37
    sae = train_a_little(make(arch), x * scale)
    hashes = save_saelens(tmp_path, sae, scale, META)
    assert set(hashes) == {"sae_weights.safetensors", "cfg.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    loaded = load_saelens(tmp_path)
    with torch.no_grad():
        z = sae.encode(x * scale)
        assert z.abs().sum() > 0
        torch.testing.assert_close(loaded.encode(x), z / scale, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), sae.decode(z) / scale, rtol=1e-5, atol=1e-5)
    # unit-norm decoder rows, as SAEBench's absorption projection (z_i * cos) assumes
    norms = load_file(str(tmp_path / "sae_weights.safetensors"))["W_dec"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(S), rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    expected = {"relu": "standard", "masked": "standard", "gated": "standard", "topk": "topk",
                "batchtopk": "jumprelu"}[arch]
    assert cfg["architecture"] == expected
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D, S, "float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg.get("k") == (4 if expected == "topk" else None)
    meta = cfg["metadata"]
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6
    assert meta["hook_name"] == META["hook_name"] and meta["model_name"] == "m"
    assert meta["context_size"] == 128 and meta["prepend_bos"] is True
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "sae_weights.safetensors")).items()}
    want = {"W_enc": (D, S), "W_dec": (S, D), "b_enc": (S,), "b_dec": (D,)}
    if expected == "jumprelu":
        want["threshold"] = (S,)
    assert shapes == want


def test_export_keeps_sae_lens_version_6_whatever_the_caller_passes(tmp_path):
    save_saelens(tmp_path, make("relu"), 1.0, {**META, "sae_lens_version": "4.3.0"})
    assert json.loads((tmp_path / "cfg.json").read_text())["metadata"]["sae_lens_version"] == "6.0.0"


def test_saelens_itself_loads_the_export(tmp_path):
    """Runs only where sae-lens is installed (not a dependency of this project)."""
    sae_lens = pytest.importorskip("sae_lens")
    x = torch.randn(32, D) * 3
    for arch in ARCHS:
        sae = train_a_little(make(arch), x * 0.5)
        save_saelens(tmp_path / arch, sae, 0.5, META)
        theirs = sae_lens.SAE.load_from_disk(tmp_path / arch)
        assert theirs.cfg.metadata.hook_name == META["hook_name"]
        if arch == "batchtopk":  # loaded as a JumpReLU at our learned running threshold
            assert theirs.cfg.architecture() == "jumprelu" and float(sae.threshold) > 0
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), sae.encode(x * 0.5), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(theirs(x), load_saelens(tmp_path / arch)(x))


# -- k-sparse ---------------------------------------------------------------------------------------
def test_topk_keeps_k_per_row_and_batchtopk_k_times_batch():
    x = torch.randn(32, D)
    _, _, _, code = make("topk").loss(x, ONE)
    z = code.dense()
    assert torch.all((z != 0).sum(-1) == 4)
    _, _, _, code = make("batchtopk").loss(x, ONE)
    z = code.dense()
    assert int((z != 0).sum()) == 4 * 32
    assert (z != 0).sum(-1).unique().numel() > 1  # per batch, not per row


def test_batchtopk_threshold_is_an_ema_of_the_smallest_kept_activation():
    sae = make("batchtopk", threshold_momentum=0.9)
    x = torch.randn(32, D)
    _, _, _, code = sae.loss(x, ONE)
    first = 0.1 * code.vals[code.vals > 0].min()
    torch.testing.assert_close(sae.threshold, first)
    _, _, _, code = sae.loss(torch.randn(32, D), ONE)
    torch.testing.assert_close(sae.threshold, 0.9 * first + 0.1 * code.vals[code.vals > 0].min())
    with torch.no_grad():  # inference: a JumpReLU at the running threshold
        pre = sae.pre_activation(x)
        torch.testing.assert_close(sae.encode(x), pre * (pre > sae.threshold))


def test_auxk_is_zero_without_dead_latents_and_positive_with_them():
    x = torch.randn(32, D)
    sae = make("topk", dead_tokens=10**9)
    _, parts, _, _ = sae.loss(x, ONE)
    assert float(parts["aux"].detach()) == 0.0
    sae = make("topk", dead_tokens=16)
    sae.loss(x, ONE)  # 32 tokens pass: latents that did not fire are now dead
    assert sae.dead_mask().any() and not sae.dead_mask().all()
    _, parts, _, _ = sae.loss(x, ONE)
    assert float(parts["aux"].detach()) == 0.0  # off until the next check (every 25 steps)
    sae.refresh(25)
    _, parts, _, _ = sae.loss(x, ONE)
    assert float(parts["aux"].detach()) > 0


@pytest.mark.parametrize("aux_k", [3, 10_000])
def test_auxk_value_matches_the_paper_formula(aux_k):
    sae = make("topk", dead_tokens=1, aux_k=aux_k, aux_coeff=0.5)
    x = torch.randn(32, D)
    sae.loss(x, ONE)  # the latents that did not fire on these 32 tokens are now dead
    dead = sae.dead_mask()
    assert dead.any() and not dead.all()
    sae.check_dead()
    _, parts, x_hat, _ = sae.loss(x, ONE)
    with torch.no_grad():
        e = x - x_hat
        pre = sae.pre_activation(x).relu().masked_fill(~dead, 0)
        kept = pre.topk(min(aux_k, S), dim=-1).values[:, -1:]
        aux_z = pre * (pre >= kept)
        want = 0.5 * ((aux_z @ sae.W_dec - e) ** 2).mean() / ((e - e.mean(0)) ** 2).mean()
    torch.testing.assert_close(parts["aux"].detach(), want)


# -- masked -----------------------------------------------------------------------------------------
def test_masked_statistics_come_from_z_not_x_hat():
    sae = make("masked", mask_momentum=0.5)
    x = torch.randn(32, D)
    _, _, x_hat, z = sae.loss(x, ONE)
    torch.testing.assert_close(sae.ema, 0.5 + 0.5 * z.detach().abs().mean(0))
    assert sae.ema.shape != x_hat.shape[1:]


def test_masked_mask_refreshes_only_every_n_steps_and_reports_its_density():
    sae = make("masked", mask_every=3, mask_eps=0.5)
    sae.ema.fill_(0.1)
    sae.ema[:16] = 1.0
    for step in (1, 2, 4, 5):
        sae.refresh(step)
        assert float(sae.mask_density()) == 0.0
    sae.refresh(6)
    assert float(sae.mask_density()) == pytest.approx(48 / 64)
    assert not sae.mask[:16].any() and sae.mask[16:].all()
    assert float(make("relu").mask_density()) == 0.0


@pytest.mark.parametrize(("penalty", "direction"), [("shrink", -1), ("restore", +1)])
def test_penalty_direction(penalty, direction):
    sae = make("masked", penalty=penalty, absorption=1.0, l1=0.0)
    sae.mask.fill_(1.0)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)  # norms 0.5: shrink pushes them down, restore back up to 1
    _, parts, _, _ = sae.loss(torch.randn(8, D), ONE)
    (grad,) = torch.autograd.grad(parts["penalty"], sae.W_dec)
    radial = (grad * sae.W_dec).sum(-1)  # d(penalty)/d(norm), up to a positive factor
    # gradient descent moves along -grad: the norm grows where radial < 0
    assert torch.all(torch.sign(-radial) == direction)
    torch.testing.assert_close(
        parts["penalty"].detach(),
        torch.tensor(0.5) if penalty == "shrink" else torch.tensor(0.25))


@pytest.mark.parametrize(("penalty", "rotates"), [("shrink", True), ("restore", False),
                                                  ("off", False)])
def test_penalty_under_adam_and_renormalisation(penalty, rotates):
    """What masked.py documents: with unit rows, restore does nothing; shrink, through Adam's
    per-coordinate scaling, rotates a dormant row toward the coordinate axes."""
    sae = make("masked", penalty=penalty, absorption=1.0, l1=0.0)
    with torch.no_grad():
        sae.b_enc[:4] = -1e6  # latents 0-3 never fire
    sae.mask[:4] = 1.0
    start = sae.W_dec[:4].detach().clone()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(32, D)
    for _ in range(100):
        loss, _, _, _ = sae.loss(x, ONE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.normalize_decoder()
    cos = (sae.W_dec[:4].detach() * start).sum(-1)
    if rotates:
        assert (cos < 0.9).all(), cos
        assert (sae.W_dec[:4].abs() < 1e-2).sum() > (start.abs() < 1e-2).sum()  # sparser rows
    else:
        torch.testing.assert_close(cos, torch.ones(4))


def test_penalty_off_has_no_term():
    _, parts, _, _ = make("masked", penalty="off").loss(torch.randn(8, D), ONE)
    assert "penalty" not in parts


# -- gated, statistics, config ----------------------------------------------------------------------
def test_gated_entropy_term_and_gate_initialisation():
    sae = make("gated", gate_reg=1.0, l1=0.0)
    assert torch.allclose(sae.gates(), torch.sigmoid(torch.tensor(2.0)).expand(S))
    _, parts, _, _ = sae.loss(torch.randn(8, D), ONE)
    p = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(parts["gate_entropy"].detach(), -(p * p.log() + (1 - p) * (1 - p).log()))
    assert float(binary_entropy(torch.tensor(0.5))) == pytest.approx(0.6931, abs=1e-4)
    assert torch.isfinite(binary_entropy(torch.tensor([0.0, 1.0]))).all()
    with torch.no_grad():
        sae.g.fill_(-1.0)
        pre = sae.pre_activation(torch.ones(2, D))
    torch.testing.assert_close(sae.activation(pre), torch.relu(torch.sigmoid(torch.tensor(-1.0)) * pre))


def test_dead_mask_counts_tokens_without_firing():
    sae = make("relu", dead_tokens=64)
    with torch.no_grad():
        sae.b_enc[:8] = -1e6  # latents 0-7 can never fire
    sae.loss(torch.randn(32, D), ONE)
    assert not sae.dead_mask().any()
    sae.loss(torch.randn(32, D), ONE)
    dead = sae.dead_mask()
    assert dead[:8].all() and int(sae.tokens_since_fired[0]) == 64
    assert int(sae.tokens_since_fired[~dead].max()) < 64


def test_l1_scale_scales_the_sparsity_term():
    sae = make("relu")
    x = torch.randn(8, D)
    _, a, _, z = sae.loss(x, ONE)
    _, b, _, _ = sae.loss(x, torch.tensor(0.25))
    torch.testing.assert_close(a["sparsity"], 1e-3 * z.abs().mean())
    torch.testing.assert_close(b["sparsity"], 0.25 * a["sparsity"])
    torch.testing.assert_close(a["mse"], (x - sae.decode(z)).pow(2).mean())


@pytest.mark.parametrize(("kw", "message"), [
    ({"arch": "nope"}, "unknown architecture 'nope' .*relu"),
    ({"arch": "topk", "k": 9}, "k must be"),
    ({"arch": "relu", "d_sae": 0}, "d_sae"),
    ({"arch": "masked", "penalty": "up"}, "unknown penalty"),
    ({"arch": "masked", "mask_momentum": 1.0}, "mask_momentum"),
    ({"arch": "relu", "l1": -1.0}, "l1 must be non-negative"),
    ({"arch": "topk", "aux_k": 0}, "aux_k"),
])
def test_config_errors_name_the_setting(kw, message):
    with pytest.raises(ValueError, match=message):
        sae_config(**{"d_in": 4, "d_sae": 8, **kw})


def test_load_and_save_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(PipelineError, match=r"cfg\.json is missing"):
        load_saelens(tmp_path)
    with pytest.raises(PipelineError, match="model_name"):
        save_saelens(tmp_path, make("relu"), 1.0, {"hook_name": "h"})
    save_saelens(tmp_path, make("relu"), 1.0, META)
    cfg_path = tmp_path / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    for change, message in [({"d_sae": 99}, "W_enc has shape"),
                            ({"architecture": "matryoshka"}, "architecture 'matryoshka'"),
                            ({"architecture": "jumprelu"}, "no tensor threshold"),
                            ({"architecture": "topk"}, "k missing"),
                            ({"normalize_activations": "layer_norm"}, "normalize_activations")]:
        cfg_path.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(PipelineError, match=message):
            load_saelens(tmp_path)
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PipelineError, match="cannot be read"):
        load_saelens(tmp_path)


# -- no host sync in the training step ----------------------------------------------------------------
class _NoHostSync(TorchFunctionMode):
    """Fails on the calls that make a CUDA step wait for the host or change shape with the data."""

    BANNED = frozenset({torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__,
                        torch.Tensor.__int__, torch.Tensor.tolist, torch.Tensor.nonzero, torch.nonzero,
                        torch.masked_select, torch.Tensor.masked_select, torch.unique,
                        torch.Tensor.unique, torch.Tensor.cpu, torch.Tensor.numpy})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.BANNED:
            raise AssertionError(f"host sync: {getattr(func, '__name__', func)}")
        if func is torch.Tensor.__getitem__ and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool
                for a in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            raise AssertionError("boolean indexing: data-dependent shape")
        return func(*args, **(kwargs or {}))


def test_the_sync_detector_catches_a_sync():
    with pytest.raises(AssertionError, match="host sync"), _NoHostSync():
        torch.ones(3).sum().item()
    with pytest.raises(AssertionError, match="boolean indexing"), _NoHostSync():
        t = torch.ones(3)
        t[t > 0]


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_decoder_step_do_no_host_sync(arch):
    sae = make(arch, dead_tokens=16)
    x = torch.randn(32, D)
    sae.loss(x, ONE)  # so that some latents are dead and AuxK runs its full path
    with _NoHostSync():
        loss, _, _, _ = sae.loss(x, ONE)
        loss.backward()
        sae.normalize_decoder()
        sae.dead_mask()
        sae.mask_density()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_is_capturable_in_a_cuda_graph(arch):
    sae = make(arch, dead_tokens=64)
    with torch.no_grad():
        sae.b_enc[0] = -1e6  # latent 0 never fires
    sae = sae.cuda()
    x = torch.randn(64, D, device="cuda")
    scale = torch.ones((), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            sae.loss(x, scale)[0].backward()
    torch.cuda.current_stream().wait_stream(s)
    before = sae.tokens_since_fired.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sae.loss(x, scale)[0].backward()
        sae.normalize_decoder()
    g.replay()
    torch.cuda.synchronize()
    assert int(sae.tokens_since_fired[0] - before[0]) == 64  # the replay updated the buffer
