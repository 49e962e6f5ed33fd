"""The k-sparse step of TopK and BatchTopK SAEs: after the encoder's forward matmul, everything
touches only the B*k active (row, latent) entries: the decoder's forward and backward and the
encoder's weight and bias gradients. Static shapes throughout (B*k entries, B bag offsets), so
the step still captures in a CUDA graph."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from pipeline.processes import ALONE, Workers
from pipeline.sae import native
from pipeline.sae.workspace import Workspace

_SUM = 0  # embedding_bag mode


@dataclass
class SparseCode:
    """A batch of k-sparse latents as entries sorted by row: vals[e] (after ReLU) of latent
    latents[e] in row rows[e]; row b's entries start at offsets[b]."""

    vals: torch.Tensor
    latents: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor
    d_sae: int

    def dense(self) -> torch.Tensor:
        """The [B, d_sae] latents (for tests and inspection; the step never builds them)."""
        z = torch.zeros(len(self.offsets), self.d_sae, dtype=self.vals.dtype,
                        device=self.vals.device)
        return z.index_put_((self.rows, self.latents), self.vals, accumulate=True)

    def l0(self) -> torch.Tensor:
        """Mean number of active latents per row."""
        return (self.vals > 0).sum().float() / len(self.offsets)

    def fired(self) -> torch.Tensor:
        """[d_sae] bool: latents active in at least one row."""
        hits = torch.zeros(self.d_sae, dtype=self.vals.dtype, device=self.vals.device)
        return hits.index_add_(0, self.latents, (self.vals > 0).to(self.vals.dtype)) > 0


def mean_l0(code: torch.Tensor | SparseCode) -> torch.Tensor:
    """Mean active latents per row of dense latents or a SparseCode."""
    if isinstance(code, SparseCode):
        return code.l0()
    return (code > 0).sum(dtype=torch.int32).float() / len(code)  # latents are ReLU outputs


def row_topk(pre: torch.Tensor, k: int, bias: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of pre + bias (bias: [width] or None), as values and
    indices (unordered), as torch.topk gives them. On CPU in float32: the C kernel of
    pipeline.sae.native, which adds the bias in the same pass (scripts/bench_kernels.py
    measures it against the torch paths); on CPU otherwise: grouped_topk; on CUDA: torch.topk
    (a per-row radix select there)."""
    if native.usable(pre):
        return native.topk_rows(pre, k, bias)
    if bias is not None:
        pre = pre + bias
    if pre.device.type != "cpu":
        return pre.topk(k, dim=-1, sorted=False)
    return grouped_topk(pre, k)


def grouped_topk(pre: torch.Tensor, k: int, stride: int = 16
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(pre, k, sorted=False) on any device, for wide rows without sorting them: split
    each row into `stride`-element groups of columns {g, g + G, g + 2G, ...} (G = width /
    stride; one amax over a middle axis, contiguous and vectorised), take the k groups with the
    largest maxima (the same way, recursively), and the k largest among their k * stride
    entries. Exact: outside those k groups no entry exceeds the k-th largest group maximum, and
    the k groups hold k entries at least that large. Narrow rows (width < 32 k) or widths not
    divisible by stride: torch.topk. BatchTopK's batch-wide top-k (one row of B x d_sae) takes
    it on CUDA too, where one torch.topk that wide sorts the whole batch."""
    b, width = pre.shape
    if width < 32 * k or width % stride:
        return pre.topk(k, dim=-1, sorted=False)
    groups = width // stride
    by_group = pre.view(b, stride, groups)
    best = grouped_topk(by_group.amax(1), k, stride)[1]                       # [b, k] groups
    cand = torch.gather(by_group, 2, best.unsqueeze(1).expand(b, stride, k))  # [b, stride, k]
    vals, at = cand.reshape(b, stride * k).topk(k, dim=-1, sorted=False)
    return vals, best.gather(1, at % k) + (at // k) * groups


def _per_row(top: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(vals, latents, rows, offsets) of a per-row top-k ([B, k] values and latent indices)."""
    b, k = idx.shape
    rows = torch.arange(b, device=idx.device).repeat_interleave(k)
    offsets = torch.arange(0, b * k, k, device=idx.device)
    return torch.relu(top).reshape(-1), idx.reshape(-1), rows, offsets


def _per_batch(pre: torch.Tensor, n: int, ranks: Workers = ALONE) -> tuple[torch.Tensor, ...]:
    """(vals, latents, rows, offsets) of the n largest entries of the whole batch, by row.
    The batch as one row through the CPU kernel or grouped_topk, never one torch.topk over the
    flat batch (one core on CPU; a full sort of B x d_sae on CUDA). Data parallel (n per
    process, the batch split over `ranks`): the global n x world largest; each process keeps
    up to all of them (static shapes) and zeroes those below the global threshold, which no
    gradient then reaches (ties at the threshold keep all of them)."""
    b, d_sae = pre.shape
    want = min(n * ranks.world, b * d_sae)
    flat_pre = pre.view(1, -1)
    found = row_topk(flat_pre, want) if native.usable(pre) else grouped_topk(flat_pre, want)
    top, flat = (t[0] for t in found)
    if ranks.world > 1:
        every = ranks.gather(top)
        top = top * (top >= every.topk(n * ranks.world, sorted=False).values.min())
    flat, order = flat.sort()
    rows = torch.div(flat, d_sae, rounding_mode="floor")
    offsets = torch.searchsorted(rows, torch.arange(b, device=pre.device))
    return torch.relu(top[order]), flat - rows * d_sae, rows, offsets


class SparseEncode(torch.autograd.Function):
    """From one encoder matmul pre = (x - b_dec) @ W_enc + b_enc: the code of the k largest
    entries per row (`per_row`) or of the k*B largest of the batch, and, when `dead` is given,
    the per-row code of the aux_k largest among dead latents (AuxK). `pre` lives in the
    workspace `ws`. Gradients reach W_enc, b_enc and b_dec through those entries only (b_dec's
    is -W_enc @ grad b_enc, a matrix-vector product); x gets none (the input is data)."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, b_dec, k: int, per_row: bool, dead, aux_k: int,
                ws: Workspace, ranks: Workers = ALONE):
        xc = x - b_dec
        pre = ws.get("pre", (len(x), w_enc.shape[1]), x)
        fold = per_row and native.usable(x)  # the CPU kernel adds b_enc in its own pass
        pre = torch.mm(xc, w_enc, out=pre) if fold else torch.addmm(b_enc, xc, w_enc, out=pre)
        main = _per_row(*row_topk(pre, k, b_enc if fold else None)) if per_row else \
            _per_batch(pre, k * len(x), ranks)
        codes = [main]
        if dead is not None:  # live latents out of reach: -inf
            only_dead = torch.zeros_like(b_enc).masked_fill_(~dead, float("-inf"))
            if fold:  # into the kernel's bias: no pass over pre
                codes.append(_per_row(*row_topk(pre, aux_k, only_dead + b_enc)))
            else:  # pre is scratch from here on: mask it in place, no second [B, d_sae]
                codes.append(_per_row(*row_topk(pre.add_(only_dead), aux_k)))
        ctx.save_for_backward(xc, w_enc, *(t for c in codes for t in c))
        ctx.d_sae = w_enc.shape[1]
        out = tuple(t for c in codes for t in c)
        ctx.mark_non_differentiable(*(t for i, t in enumerate(out) if i % 4))
        return out

    @staticmethod
    def backward(ctx, *grads):
        xc, w_enc, *saved = ctx.saved_tensors
        grad_wt = grad_b_enc = None
        for i in range(0, len(saved), 4):
            vals, latents, rows, _offsets = saved[i:i + 4]
            if grads[i] is None:
                continue
            g = grads[i] * (vals > 0)                                    # through the ReLU
            part = outer_sum(g, latents, rows, xc, ctx.d_sae)  # [d_sae, d_in]
            bias = torch.zeros(ctx.d_sae, dtype=xc.dtype, device=xc.device).index_add_(
                0, latents, g)
            grad_wt = part if grad_wt is None else grad_wt.add_(part)
            grad_b_enc = bias if grad_b_enc is None else grad_b_enc.add_(bias)
        if grad_wt is None:
            return (None,) * 10
        grad_b_dec = -(w_enc @ grad_b_enc)
        return None, grad_wt.t(), grad_b_enc, grad_b_dec, None, None, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """x_hat[b] = sum over row b's entries of vals[e] * W_dec[latents[e]] (no bias), as an
    embedding bag; the backward gives vals their gradient (one dot product per entry: on CPU
    entry_dots, faster than embedding_bag's own kernel; elsewhere that kernel) and W_dec its
    gradient through outer_sum (the built-in backward sorts all B*k indices)."""

    @staticmethod
    def forward(ctx, vals, latents, rows, offsets, w_dec):
        out, offset2bag, _, _ = torch.ops.aten._embedding_bag(
            w_dec, latents, offsets, False, _SUM, False, vals, False, -1)
        ctx.save_for_backward(vals, latents, rows, offsets, offset2bag, w_dec)
        return out

    @staticmethod
    def backward(ctx, g):
        vals, latents, rows, offsets, offset2bag, w_dec = ctx.saved_tensors
        g = g.contiguous()
        if g.device.type == "cpu":
            grad_vals = entry_dots(g, w_dec, latents, offsets)
        else:
            grad_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                g, w_dec, latents, offsets, offset2bag, _SUM, -1)
        grad_w = outer_sum(vals, latents, rows, g, w_dec.shape[0])
        return grad_vals, None, None, None, grad_w


def entry_dots(g: torch.Tensor, w: torch.Tensor, latents: torch.Tensor, offsets: torch.Tensor
               ) -> torch.Tensor:
    """dot(g[b], w[latents[e]]) for every entry e of every row b (row b's entries start at
    offsets[b]), in entry order (CPU): the C kernel, else the product g w^T sampled at the
    code's pattern by MKL."""
    if native.usable(g):
        return native.entry_dots(g, w, latents, offsets)
    crow = torch.cat([offsets, offsets.new_tensor([len(latents)])])
    pattern = csr_tensor(crow, latents, g.new_zeros(len(latents)), (len(g), len(w)))
    return torch.sparse.sampled_addmm(pattern, g, w.t(), beta=0).values()


def csr_tensor(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
               shape: tuple[int, int]) -> torch.Tensor:
    """torch.sparse_csr_tensor without the warning that torch's sparse API is in beta."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, shape)


def sparse_decode(code: SparseCode, w_dec: torch.Tensor) -> torch.Tensor:
    """x_hat without b_dec from a code."""
    return SparseDecode.apply(code.vals, code.latents, code.rows, code.offsets, w_dec)


def outer_sum(g: torch.Tensor, latents: torch.Tensor, rows: torch.Tensor, m: torch.Tensor,
              d_sae: int, index_add: bool | None = None) -> torch.Tensor:
    """out[latents[e]] += g[e] * m[rows[e]] over all entries: [d_sae, width]. CPU: the C kernel
    (a counting sort by latent, then each output row summed by one thread), else one CSR sparse
    x dense product (MKL), written into a new tensor with beta 0, which skips the
    zero fill and the copy that torch.sparse.mm makes around the same product. CUDA: index_add
    in blocks of entries, which has static shapes and no host sync, so it captures in a CUDA
    graph (a sparse tensor's coalescing does not)."""
    if not (m.device.type == "cuda" if index_add is None else index_add):
        if native.usable(m):
            return native.outer_sum(g, latents, rows, m, d_sae)
        order = torch.argsort(latents)
        crow = torch.zeros(d_sae + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(latents, minlength=d_sae), 0, out=crow[1:])
        s = csr_tensor(crow, rows[order], g[order], (d_sae, len(m)))
        out = torch.empty(d_sae, m.shape[1], dtype=m.dtype)
        return torch.addmm(out, s, m, beta=0, out=out)
    out = torch.zeros(d_sae, m.shape[1], dtype=m.dtype, device=m.device)
    for lo in range(0, len(g), 8192):
        sl = slice(lo, lo + 8192)
        out.index_add_(0, latents[sl], g[sl, None] * m.index_select(0, rows[sl]))
    return out
