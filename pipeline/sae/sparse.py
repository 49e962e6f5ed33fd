"""k-sparse kernels for TopK SAEs: the decoder's forward and backward and the encoder's weight
gradient touch only the B*k active (row, latent) pairs, so a step costs little more than the
encoder's forward matmul. Static shapes throughout (B*k entries), so the step still captures in a
CUDA graph."""

from __future__ import annotations

import warnings

import torch


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """x_hat[b] = sum_j vals[b, j] * W_dec[idx[b, j]] (no bias), as an embedding bag: its
    built-in backward gives the gradients of vals and W_dec from the active rows only."""
    return torch.nn.functional.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum")


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
        d_sae = ctx.shape[1]
        pairs = [(g * (v > 0), ids) for g, ids, v in ((grad_vals, idx, vals),
                                                      (grad_avals, aidx, avals)) if g is not None]
        g = torch.cat([p[0] for p in pairs], 1)                     # relu'd, [B, k + aux_k]
        ids = torch.cat([p[1] for p in pairs], 1)
        grad_wt = _outer_sum(g, ids, x, d_sae)                      # [d_sae, d_in]
        grad_bias = torch.zeros(d_sae, dtype=x.dtype, device=x.device)
        grad_bias.index_add_(0, ids.reshape(-1), g.reshape(-1))
        return None, grad_wt.t(), grad_bias, None, None, None


def _outer_sum(g: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, d_sae: int,
               index_add: bool | None = None) -> torch.Tensor:
    """sum over (b, j) of g[b, j] * x[b] into row ids[b, j]: the encoder's weight gradient.
    CPU: one sparse x dense product (MKL). CUDA: index_add in blocks of rows, which has static
    shapes and no host sync, so it captures in a CUDA graph (a sparse tensor's coalescing does
    not)."""
    if not (x.device.type == "cuda" if index_add is None else index_add):
        rows = torch.arange(len(ids), device=x.device).repeat_interleave(ids.shape[1])
        with warnings.catch_warnings():  # torch's sparse API still calls itself beta
            warnings.simplefilter("ignore", UserWarning)
            g_t = torch.sparse_coo_tensor(torch.stack([ids.reshape(-1), rows]), g.reshape(-1),
                                          (d_sae, len(ids)))
            return torch.sparse.mm(g_t, x)
    out = torch.zeros(d_sae, x.shape[1], dtype=x.dtype, device=x.device)
    for lo in range(0, len(ids), 256):
        sl = slice(lo, lo + 256)
        out.index_add_(0, ids[sl].reshape(-1),
                       (g[sl].unsqueeze(2) * x[sl].unsqueeze(1)).reshape(-1, x.shape[1]))
    return out


def scatter_dense(vals: torch.Tensor, idx: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The dense [B, d_sae] latents of a k-sparse code (for metrics and statistics)."""
    return torch.zeros(len(idx), d_sae, dtype=vals.dtype, device=vals.device).scatter_(
        1, idx, vals)
