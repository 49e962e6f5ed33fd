"""The dense step of ReLU SAEs (relu, masked) as one autograd function over reused buffers.

Autograd over the plain expression makes about nine passes over the [batch, d_sae] latents
beyond the five matmuls (ReLU, its mask in the backward, the l1 gradient added to the decoder's,
the firing and L0 reductions) and allocates a fresh [batch, d_sae] tensor for most of them, which
on CPU means page faults on every step. Here the latents and their gradient live in two buffers
that every step reuses, and the extra passes are: ReLU in place, one column sum (which gives the
l1 term, the firing latents and the masked SAE's per-latent means at once), the l1 gradient
broadcast into the decoder's backward matmul (addmm's input), the ReLU mask applied in place, and
the encoder-bias gradient. tests/test_sae.py checks loss, gradients and weights against the plain
expression."""

from __future__ import annotations

import torch

from pipeline.sae.workspace import Workspace


class DenseReLU(torch.autograd.Function):
    """From x, W_enc [d_in, d_sae], bias [d_sae] (b_enc with b_dec folded in) and W_dec:
    (x_hat without b_dec, column sums of z, z, column counts of z > 0) with
    z = relu(x W_enc + bias) in the workspace. The column sums are differentiable (the l1 term
    and any per-latent loss on mean z flow through them); z (valid until the next step) and the
    counts are statistics."""

    @staticmethod
    def forward(ctx, x, w_enc, bias, w_dec, ws: Workspace):
        shape = (x.shape[0], w_enc.shape[1])
        z, grad = ws.get("z", shape, x), ws.get("grad_z", shape, x)
        torch.addmm(bias, x, w_enc, out=z).relu_()
        x_hat = z @ w_dec
        colsum = z.sum(0)
        counts = torch.sign(z, out=grad).sum(0)  # grad is free until the backward: scratch
        ctx.save_for_backward(x, w_dec)
        ctx.z, ctx.grad = z, grad  # workspace buffers: not versioned, rewritten next step
        ctx.mark_non_differentiable(z, counts)
        ctx.set_materialize_grads(False)  # no [B, d_sae] zeros for z's (absent) gradient
        return x_hat, colsum, z, counts

    @staticmethod
    def backward(ctx, g_xhat, g_colsum, _g_z, _g_counts):
        x, w_dec = ctx.saved_tensors
        z, gz = ctx.z, ctx.grad
        if g_xhat is None:
            g_xhat = x.new_zeros(x.shape[0], w_dec.shape[1])
        g_xhat = g_xhat.contiguous()
        if g_colsum is None:
            torch.mm(g_xhat, w_dec.t(), out=gz)
        else:
            torch.addmm(g_colsum, g_xhat, w_dec.t(), out=gz)  # dL/dz: decoder + column sums
        torch.ops.aten.threshold_backward.grad_input(gz, z, 0, grad_input=gz)  # through ReLU
        grad_w_dec = z.t() @ g_xhat
        grad_w_enc = x.t() @ gz
        grad_bias = gz.sum(0)
        return None, grad_w_enc, grad_bias, grad_w_dec, None
