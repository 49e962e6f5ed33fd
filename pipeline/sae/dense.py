"""The dense step of ReLU SAEs (relu, masked) as one autograd function over reused buffers.

Autograd over the plain expression makes about nine passes over the [batch, d_sae] latents
beyond the five matmuls (ReLU, its mask in the backward, the l1 gradient added to the decoder's,
the firing and L0 reductions) and allocates a fresh [batch, d_sae] tensor for most of them, which
on CPU means page faults on every step. Here the latents and their gradient live in two buffers
that every step reuses, and the extra passes are: ReLU in place, one column sum (which gives the
l1 term, the firing latents and the masked SAE's per-latent means at once), the L0 count (sign
into the spare buffer, then a column sum), the l1 gradient
broadcast into the decoder's backward matmul (addmm's input), the ReLU mask applied in place, and
the encoder-bias gradient. tests/test_dense.py checks loss, gradients and weights against the plain
expression."""

from __future__ import annotations

import torch

from pipeline.sae.workspace import Workspace


class DenseReLU(torch.autograd.Function):
    """From x, W_enc [d_in, d_sae], b_enc, b_dec and W_dec [d_sae, d_in]: (x_hat, column sums
    of z, z, column counts of z > 0) with z = relu((x - b_dec) W_enc + b_enc) in the workspace
    and x_hat = z W_dec + b_dec. The column sums are differentiable (the l1 term and any
    per-latent loss on mean z flow through them); z (valid until the next step) and the counts
    are statistics. b_dec's gradient through the encoder is -W_enc @ grad b_enc, a
    matrix-vector product."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, b_dec, w_dec, ws: Workspace):
        shape = (x.shape[0], w_enc.shape[1])
        z, grad = ws.get("z", shape, x), ws.get("grad_z", shape, x)
        xc = x - b_dec
        torch.addmm(b_enc, xc, w_enc, out=z).relu_()
        x_hat = torch.addmm(b_dec, z, w_dec)
        colsum = z.sum(0)
        counts = torch.sign(z, out=grad).sum(0)  # grad is free until the backward: scratch
        ctx.save_for_backward(xc, w_enc, w_dec)
        ctx.z, ctx.grad = z, grad  # workspace buffers: not versioned, rewritten next step
        ctx.mark_non_differentiable(z, counts)
        ctx.set_materialize_grads(False)  # no [B, d_sae] zeros for z's (absent) gradient
        return x_hat, colsum, z, counts

    @staticmethod
    def backward(ctx, g_xhat, g_colsum, _g_z, _g_counts):
        xc, w_enc, w_dec = ctx.saved_tensors
        z, gz = ctx.z, ctx.grad
        if g_xhat is None:
            g_xhat = xc.new_zeros(xc.shape)
        g_xhat = g_xhat.contiguous()
        if g_colsum is None:
            torch.mm(g_xhat, w_dec.t(), out=gz)
        else:
            torch.addmm(g_colsum, g_xhat, w_dec.t(), out=gz)  # dL/dz: decoder + column sums
        torch.ops.aten.threshold_backward.grad_input(gz, z, 0, grad_input=gz)  # through ReLU
        grad_w_dec = z.t() @ g_xhat
        grad_w_enc = (gz.t() @ xc).t()  # in W_enc's own (column-major) strides: no copy
        grad_b_enc = gz.sum(0)
        grad_b_dec = g_xhat.sum(0) - w_enc @ grad_b_enc
        return None, grad_w_enc, grad_b_enc, grad_b_dec, grad_w_dec, None
