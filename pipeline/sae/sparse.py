"""k-sparse kernels for TopK SAEs: the decoder's forward and backward and the encoder's weight
gradient touch only the B*k active (row, latent) pairs, so a step costs little more than the
encoder's forward matmul. Static shapes throughout (B*k entries), so the step still captures in a
CUDA graph. Work is done in blocks of rows to bound the B x k x d temporaries."""

from __future__ import annotations

import torch

BLOCK = 512


def _blocks(n: int):
    for lo in range(0, n, BLOCK):
        yield slice(lo, min(lo + BLOCK, n))


class SparseDecode(torch.autograd.Function):
    """x_hat[b] = sum_j vals[b, j] * W_dec[idx[b, j]] (no bias)."""

    @staticmethod
    def forward(ctx, vals: torch.Tensor, idx: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(vals, idx, w_dec)
        return torch.nn.functional.embedding_bag(idx, w_dec, per_sample_weights=vals,
                                                 mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        vals, idx, w_dec = ctx.saved_tensors
        grad_vals = torch.empty_like(vals)
        grad_w = torch.zeros_like(w_dec)
        d = w_dec.shape[1]
        for s in _blocks(len(idx)):
            rows = w_dec[idx[s]]                                   # [b, k, d]
            g = grad[s]
            grad_vals[s] = torch.bmm(rows, g.unsqueeze(2)).squeeze(2)
            grad_w.index_add_(0, idx[s].reshape(-1),
                              (vals[s].unsqueeze(2) * g.unsqueeze(1)).reshape(-1, d))
        return grad_vals, None, grad_w


class SparseTopK(torch.autograd.Function):
    """From one encoder matmul pre = x @ W_enc + bias: (vals, idx) of the k largest relu(pre) per
    row, and (aux_vals, aux_idx) of the aux_k largest among dead latents (AuxK). The backward
    reaches W_enc and bias only through those entries (index_add), never as a dense [B, d_sae]
    gradient."""

    @staticmethod
    def forward(ctx, x, w_enc, bias, k: int, dead: torch.Tensor, aux_k: int):
        pre = torch.addmm(bias, x, w_enc)
        top, idx = pre.topk(k, dim=-1, sorted=False)
        atop, aidx = pre.masked_fill_(~dead, float("-inf")).topk(aux_k, dim=-1, sorted=False)
        vals, avals = torch.relu(top), torch.relu(atop)
        ctx.save_for_backward(x, idx, vals, aidx, avals)
        ctx.shape = w_enc.shape
        ctx.mark_non_differentiable(idx, aidx)
        return vals, idx, avals, aidx

    @staticmethod
    def backward(ctx, grad_vals, _gi, grad_avals, _gai):
        x, idx, vals, aidx, avals = ctx.saved_tensors
        d_in, d_sae = ctx.shape
        grad_wt = torch.zeros(d_sae, d_in, dtype=x.dtype, device=x.device)  # W_enc^T layout
        grad_bias = torch.zeros(d_sae, dtype=x.dtype, device=x.device)
        for g, ids, v in ((grad_vals, idx, vals), (grad_avals, aidx, avals)):
            if g is None:
                continue
            g = g * (v > 0)                                         # relu
            for s in _blocks(len(ids)):
                grad_wt.index_add_(0, ids[s].reshape(-1),
                                   (g[s].unsqueeze(2) * x[s].unsqueeze(1)).reshape(-1, d_in))
            grad_bias.index_add_(0, ids.reshape(-1), g.reshape(-1))
        return None, grad_wt.t(), grad_bias, None, None, None


def scatter_dense(vals: torch.Tensor, idx: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The dense [B, d_sae] latents of a k-sparse code (for metrics and statistics)."""
    return torch.zeros(len(idx), d_sae, dtype=vals.dtype, device=vals.device).scatter_(
        1, idx, vals)
