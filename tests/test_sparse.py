"""The k-sparse TopK and BatchTopK steps equal the dense reference: loss, gradients, weights after
Adam; the AuxK switch; the kernels against dense products."""

from __future__ import annotations

import pytest
import torch

from pipeline.sae import build_sae, native, sae_config
from pipeline.sae.sparse import SparseCode, outer_sum, sparse_decode

ARCHS = ("topk", "batchtopk")


def make(arch: str, sparse: bool, x: torch.Tensor, device: str = "cpu"):
    sae = build_sae(sae_config(arch=arch, d_in=32, d_sae=128, k=8, aux_k=16, dead_tokens=200,
                              sparse=sparse), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        sae.b_enc.copy_(torch.randn(128, generator=torch.Generator().manual_seed(5)))
        sae.b_enc[:40] = -50.0  # 40 latents never fire: dead after the first batch, AuxK works
        sae.b_enc[40:48] = -4.0  # some rows have fewer than k positive pre-activations
    return sae.to(device)


def dense(code) -> torch.Tensor:
    return code.dense() if isinstance(code, SparseCode) else code


def run_steps(arch: str, sparse: bool, x: torch.Tensor, steps: int = 6):
    sae = make(arch, sparse, x, x.device.type)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    history = []
    for s in range(steps):
        loss, parts, x_hat, code = sae.loss(x, torch.tensor(1.0, device=x.device))
        opt.zero_grad()
        loss.backward()
        history.append(({k: v.detach() for k, v in parts.items()}, x_hat.detach(),
                        dense(code).detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}))
        opt.step()
        sae.normalize_decoder()
        sae.check_dead() if s == 0 else sae.refresh(s + 1)
    return history, {k: v.clone() for k, v in sae.state_dict().items()}


def assert_same_steps(arch: str, x: torch.Tensor) -> None:
    (dense_h, dense_state), (sparse_h, sparse_state) = (run_steps(arch, s, x) for s in (False, True))
    assert float(dense_h[-1][0]["aux"]) > 0  # the AuxK path was exercised
    assert float(dense_h[0][0]["aux"]) == 0  # and was off before the first check
    for (pd, xd, zd, gd), (ps, xs, zs, gs) in zip(dense_h, sparse_h, strict=True):
        for k in pd:
            torch.testing.assert_close(ps[k], pd[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xs, xd, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(zs, zd, rtol=1e-5, atol=1e-5)
        for n in gd:
            torch.testing.assert_close(gs[n], gd[n], rtol=1e-4, atol=1e-6)
    for k in dense_state:
        torch.testing.assert_close(sparse_state[k].float(), dense_state[k].float(),
                                   rtol=1e-4, atol=1e-6)


def paths(monkeypatch, use_native: bool) -> None:
    """Take the C kernels (skip where they cannot be built) or torch's paths."""
    monkeypatch.setenv("PIPELINE_NATIVE", "1" if use_native else "0")
    if use_native and native.library() is None:
        pytest.skip("no C compiler: the CPU kernels are not built")


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_and_dense_steps_agree_over_several_adam_steps(arch, use_native, monkeypatch):
    paths(monkeypatch, use_native)
    assert_same_steps(arch, torch.randn(300, 32, generator=torch.Generator().manual_seed(1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_and_dense_steps_agree_on_cuda(arch):
    assert_same_steps(arch, torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
                      .cuda())


def test_batchtopk_code_varies_per_row_and_keeps_k_times_batch():
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    _, _, _, code = make("batchtopk", True, x).loss(x, torch.tensor(1.0))
    assert len(code.vals) == 8 * 300
    assert torch.equal(code.rows, code.rows.sort().values)
    per_row = torch.bincount(code.rows, minlength=300)
    assert per_row.unique().numel() > 1
    assert torch.equal(code.offsets, torch.cumsum(per_row, 0) - per_row)


def test_the_auxk_switch_survives_a_state_dict_round_trip():
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    sae = make("topk", True, x)
    sae.loss(x, torch.tensor(1.0))
    sae.check_dead()
    assert sae.aux_active and sae.graph_key() is True
    fresh = make("topk", True, x)
    assert not fresh.aux_active
    fresh.load_state_dict(sae.state_dict())
    assert fresh.aux_active


@pytest.mark.parametrize("use_native", [True, False])
def test_sparse_decode_gradients_match_autograd_of_the_dense_product(use_native, monkeypatch):
    paths(monkeypatch, use_native)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 7, generator=g, requires_grad=True)
    rows = torch.randint(0, 1100, (3000,), generator=g).sort().values  # empty rows included
    latents = torch.randint(0, 50, (3000,), generator=g)
    vals = torch.rand(3000, generator=g, requires_grad=True)
    offsets = torch.searchsorted(rows, torch.arange(1100))
    code = SparseCode(vals, latents, rows, offsets, 50)
    out = sparse_decode(code, w)
    ref = torch.zeros(1100, 50).index_put((rows, latents), vals, accumulate=True) @ w
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(1100, 7, generator=g)
    gv, gw = torch.autograd.grad(out, (vals, w), grad)
    rv, rw = torch.autograd.grad(ref, (vals, w), grad)
    torch.testing.assert_close(gv, rv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_native", [True, False])
def test_every_outer_sum_kernel_agrees(use_native, monkeypatch):
    paths(monkeypatch, use_native)
    gen = torch.Generator().manual_seed(2)
    g, m = torch.randn(20000, generator=gen), torch.randn(600, 9, generator=gen)
    latents = torch.randint(0, 40, (20000,), generator=gen)
    rows = torch.randint(0, 600, (20000,), generator=gen)
    for d_sae in (40, 50):  # 50: latents 40-49 have no entries
        ref = torch.zeros(d_sae, 600).index_put((latents, rows), g, accumulate=True) @ m
        for index_add in (False, True):  # C or CSR x dense (CPU); blocked index_add (CUDA)
            torch.testing.assert_close(outer_sum(g, latents, rows, m, d_sae, index_add), ref,
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_step_captures_in_a_cuda_graph_for_each_auxk_state(arch):
    from pipeline.train.step import TrainStep

    sae = make(arch, True, torch.randn(64, 32), "cuda")
    step = TrainStep(sae, 64, 32, 1.0, 20, 1e-3, use_graph=True)
    for s in range(12):
        step.load(torch.randn(64, 32, device="cuda"))
        step.run()
        if s == 5:
            sae.check_dead()  # latents 0-39 never fired: AuxK turns on, a second capture
    torch.cuda.synchronize()
    assert set(step.graphs) == {False, True}
    assert torch.isfinite(step.sums["loss"])


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("width", [1024, 4608, 20000, 36864])  # 36864: two levels of groups
def test_row_topk_selects_what_torch_topk_selects(width, use_native, monkeypatch):
    from pipeline.sae.sparse import row_topk

    paths(monkeypatch, use_native)
    gen = torch.Generator().manual_seed(width)
    pre = torch.randn(64, width, generator=gen)
    pre[:8, : width // 2] = float("-inf")  # as the AuxK masking leaves rows
    pre[8:16] = torch.randint(0, 5, (8, width), generator=gen).float()  # ties everywhere
    vals, idx = row_topk(pre, 32)
    ref = pre.topk(32, dim=-1, sorted=False)
    torch.testing.assert_close(vals.sort(-1).values, ref.values.sort(-1).values)
    torch.testing.assert_close(pre.gather(1, idx), vals)  # the indices point at the values
    assert all(len(set(row.tolist())) == 32 for row in idx)  # no entry taken twice
    torch.testing.assert_close(idx[16:].sort(-1).values, ref.indices[16:].sort(-1).values)
    bias = torch.randn(width, generator=gen)
    vals, idx = row_topk(pre, 32, bias)  # the bias folded in: the same as adding it first
    ref = (pre + bias).topk(32, dim=-1, sorted=False)
    torch.testing.assert_close(vals.sort(-1).values, ref.values.sort(-1).values)
    torch.testing.assert_close((pre + bias).gather(1, idx), vals)


@pytest.mark.parametrize("use_native", [True, False])
def test_batch_wide_topk_selects_what_torch_topk_selects(use_native, monkeypatch):
    from pipeline.sae.sparse import _per_batch

    paths(monkeypatch, use_native)
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(48, 256, generator=gen)  # d_sae 256 >= 32 k: the grouped path
    pre[:4] = torch.randint(0, 3, (4, 256), generator=gen).float()  # ties
    n = 4 * 48
    vals, latents, rows, offsets = _per_batch(pre, n)
    ref = pre.view(-1).topk(n, sorted=False).values
    torch.testing.assert_close(vals.sort().values, torch.relu(ref).sort().values)
    torch.testing.assert_close(torch.relu(pre[rows, latents]), vals)
    assert len(set((rows * 256 + latents).tolist())) == n  # no entry taken twice
    assert torch.all(rows[1:] >= rows[:-1])  # by row, as the code's offsets say
    torch.testing.assert_close(offsets, torch.searchsorted(rows, torch.arange(48)))


def test_batch_wide_topk_never_sorts_the_whole_batch(monkeypatch):
    """The path CUDA takes (no CPU kernel): every torch.topk it runs is far narrower than the
    flat batch, and the result is still exact."""
    from pipeline.sae import sparse

    paths(monkeypatch, False)
    widths, real = [], torch.Tensor.topk

    def spy(self, *args, **kwargs):
        widths.append(self.shape[-1])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", spy)
    pre = torch.randn(256, 4096, generator=torch.Generator().manual_seed(1))
    n = 8 * 256
    vals = sparse._per_batch(pre, n)[0]
    monkeypatch.setattr(torch.Tensor, "topk", real)
    assert max(widths) <= pre.numel() // 16
    torch.testing.assert_close(vals.sort().values, pre.view(-1).topk(n).values.sort().values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_wide_topk_on_cuda_stays_small():
    """At 4096 x 32768, k 64 (the issue's shape): one torch.topk over the batch took ~4 GB of
    temporaries; the grouped path needs a small multiple of the batch itself."""
    from pipeline.sae.sparse import _per_batch

    pre = torch.randn(4096, 32768, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    vals = _per_batch(pre, 64 * 4096)[0]
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < pre.numel() * pre.element_size()
    ref = pre.view(-1).topk(64 * 4096).values
    torch.testing.assert_close(vals.sort().values, torch.relu(ref).sort().values)
