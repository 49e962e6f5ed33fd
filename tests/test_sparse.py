"""The k-sparse TopK step equals the dense reference: loss, gradients, weights after Adam."""

from __future__ import annotations

import pytest
import torch

from pipeline.sae import SAEConfig, build_sae
from pipeline.sae.sparse import sparse_decode


def make(sparse: bool, x: torch.Tensor):
    sae = build_sae(SAEConfig(arch="topk", d_in=32, d_sae=128, k=8, aux_k=16, dead_tokens=200,
                              sparse=sparse), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        sae.b_enc.copy_(torch.randn(128, generator=torch.Generator().manual_seed(5)))
        sae.b_enc[:40] = -50.0  # 40 latents never fire: dead after the first batch, AuxK works
        sae.b_enc[40:48] = -4.0  # some rows have fewer than k positive pre-activations
    return sae


def test_sparse_and_dense_topk_steps_agree_over_several_adam_steps():
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    runs = {}
    for sparse in (False, True):
        sae = make(sparse, x)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        history = []
        for _ in range(6):
            loss, parts, x_hat, z = sae.loss(x, torch.tensor(1.0))
            opt.zero_grad()
            loss.backward()
            history.append(({k: v.detach() for k, v in parts.items()}, x_hat.detach(),
                            z.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}))
            opt.step()
            sae.normalize_decoder()
        runs[sparse] = (history, {k: v.clone() for k, v in sae.state_dict().items()})
    (dense, dense_state), (sparse, sparse_state) = runs[False], runs[True]
    assert float(dense[-1][0]["aux"]) > 0  # the AuxK path was exercised
    for (pd, xd, zd, gd), (ps, xs, zs, gs) in zip(dense, sparse, strict=True):
        for k in pd:
            torch.testing.assert_close(ps[k], pd[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xs, xd, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(zs, zd, rtol=1e-5, atol=1e-5)
        for n in gd:
            torch.testing.assert_close(gs[n], gd[n], rtol=1e-4, atol=1e-6)
    for k in dense_state:
        torch.testing.assert_close(sparse_state[k].float(), dense_state[k].float(),
                                   rtol=1e-4, atol=1e-6)


def test_sparse_decode_gradients_match_autograd_of_the_dense_product():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 7, generator=g, requires_grad=True)
    idx = torch.randint(0, 50, (1100, 3), generator=g)  # more rows than one block
    vals = torch.rand(1100, 3, generator=g, requires_grad=True)
    out = sparse_decode(vals, idx, w)
    z = torch.zeros(1100, 50).scatter_add(1, idx, vals)
    ref = z @ w
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(1100, 7, generator=g)
    gv, gw = torch.autograd.grad(out, (vals, w), grad)
    rv, rw = torch.autograd.grad(ref, (vals, w), grad)
    torch.testing.assert_close(gv, rv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_topk_step_captures_in_a_cuda_graph():
    from pipeline.train.step import TrainStep

    sae = make(True, torch.randn(64, 32)).cuda()
    step = TrainStep(sae, 64, 32, 1.0, 20, 1e-3, use_graph=True)
    for _ in range(6):
        step.load(torch.randn(64, 32, device="cuda"))
        step.run()
    torch.cuda.synchronize()
    assert step.graph is not None


def test_both_encoder_gradient_kernels_agree():
    from pipeline.sae.sparse import _outer_sum

    gen = torch.Generator().manual_seed(2)
    g, x = torch.randn(600, 5, generator=gen), torch.randn(600, 9, generator=gen)
    ids = torch.randint(0, 40, (600, 5), generator=gen)
    dense = torch.zeros(600, 40).scatter_add(1, ids, g).t() @ x
    for index_add in (False, True):  # sparse x dense (CPU) and blocked index_add (CUDA)
        torch.testing.assert_close(_outer_sum(g, ids, x, 40, index_add), dense,
                                   rtol=1e-4, atol=1e-4)
