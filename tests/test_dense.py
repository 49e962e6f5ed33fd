"""The dense ReLU step (pipeline.sae.dense, used by relu and masked) equals the plain autograd
expression of SAE.loss: loss, parts, latents, L0, statistics, gradients and weights after several
Adam steps; its [batch, d_sae] buffers are reused from step to step."""

from __future__ import annotations

import pytest
import torch

from pipeline.sae import build_sae, sae_config
from pipeline.sae.base import SAE
from pipeline.sae.sparse import mean_l0
from pipeline.train.step import TrainStep

ARCHS = ("relu", "masked")


def make(arch: str, **kw):
    sae = build_sae(sae_config(arch=arch, d_in=32, d_sae=128, l1=0.05, mask_every=2,
                              mask_eps=0.1, mask_momentum=0.5, absorption=0.1, dead_tokens=200, **kw),
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        sae.b_dec.normal_(generator=gen)
        sae.b_enc.normal_(std=0.5, generator=gen)
        sae.b_enc[:30] = -50.0  # 30 latents never fire: dead, and masked once the EMA decays
    return sae


def run_steps(arch: str, reference: bool, x: torch.Tensor, steps: int = 6, **kw):
    sae = make(arch, **kw)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    history = []
    for s in range(steps):
        l1_scale = torch.tensor(0.5 + 0.1 * s)
        loss, parts, x_hat, z = (SAE.loss(sae, x, l1_scale) if reference else
                                 sae.loss(x, l1_scale))
        l0 = mean_l0(z) if reference else sae.l0(z)
        opt.zero_grad()
        loss.backward()
        history.append((float(loss.detach()), {k: v.detach() for k, v in parts.items()}, x_hat.detach(),
                        z.detach().clone(), l0, {n: p.grad.clone() for n, p in sae.named_parameters()},
                        {n: b.clone() for n, b in sae.named_buffers()}))
        opt.step()
        sae.normalize_decoder()
        sae.refresh(s + 1)
    return history, {k: v.clone() for k, v in sae.state_dict().items()}


@pytest.mark.parametrize(("arch", "kw"), [("relu", {}), ("masked", {}),
                                          ("masked", {"penalty": "restore"})])
def test_dense_relu_step_equals_the_plain_expression_over_several_adam_steps(arch, kw):
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    (ref_h, ref_state), (ours_h, ours_state) = (run_steps(arch, r, x, **kw) for r in (True, False))
    if arch == "masked":
        assert float(ref_h[-1][1]["penalty"]) > 0  # the mask came on: the penalty was exercised
    for (lr, pr, xr, zr, l0r, gr, br), (lo, po, xo, zo, l0o, go, bo) in zip(ref_h, ours_h,
                                                                            strict=True):
        assert lo == pytest.approx(lr, rel=1e-5)
        assert sorted(po) == sorted(pr)
        for k in pr:
            torch.testing.assert_close(po[k], pr[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(xo, xr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(zo, zr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l0o, l0r)
        for n in gr:
            torch.testing.assert_close(go[n], gr[n], rtol=1e-4, atol=1e-7)
        for n in br:
            torch.testing.assert_close(bo[n].float(), br[n].float(), rtol=1e-5, atol=1e-7)
    for k in ref_state:
        torch.testing.assert_close(ours_state[k].float(), ref_state[k].float(), rtol=1e-4,
                                   atol=1e-6)


def test_dense_relu_with_l1_off_equals_the_plain_expression():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    sae, ref = make("relu"), make("relu")
    sae.cfg.l1 = ref.cfg.l1 = 0.0
    loss, *_ = sae.loss(x, torch.tensor(1.0))
    ref_loss, *_ = SAE.loss(ref, x, torch.tensor(1.0))
    loss.backward()
    ref_loss.backward()
    for (n, p), (_, q) in zip(sae.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_dense_relu_function_when_only_x_hat_has_a_gradient():
    """Column sums unused: their gradient reaches the backward as None."""
    from pipeline.sae.dense import DenseReLU
    from pipeline.sae.workspace import Workspace

    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    sae = make("relu")
    params = [sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec]
    x_hat, *_ = DenseReLU.apply(x, *params, Workspace())
    ours = torch.autograd.grad((x_hat - x).pow(2).sum(), params)
    plain = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc) @ sae.W_dec + sae.b_dec
    ref = torch.autograd.grad((plain - x).pow(2).sum(), params)
    for name, o, r in zip(("W_enc", "b_enc", "b_dec", "W_dec"), ours, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_step_reuses_its_latent_buffers_across_steps(arch):
    sae = make(arch)
    step = TrainStep(sae, 64, 32, 1.0, 100, 1e-3)
    step.load(torch.randn(64, 32))
    step.run()
    ptrs = {n: b.data_ptr() for n, b in sae.workspace._buffers.items()}
    assert sorted(ptrs) == ["grad_z", "z"]
    for _ in range(3):
        step.load(torch.randn(64, 32))
        step.run()
    assert {n: b.data_ptr() for n, b in sae.workspace._buffers.items()} == ptrs
