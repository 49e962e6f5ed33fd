"""The reconstruction term mean((x - x_hat)^2) in two passes over the batch forward and one
backward, with the residual handed back for the AuxK loss. Autograd over the plain expression
makes four forward passes (sub, pow, mean) and four backward (pow's backward alone computes
err^1, times 2, times the upstream gradient, then the sub's negation)."""

from __future__ import annotations

import torch


class SquaredError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_hat):
        err = x - x_hat
        ctx.save_for_backward(err)
        ctx.mark_non_differentiable(err)
        return mean_square(err), err

    @staticmethod
    def backward(ctx, g, _g_err):
        (err,) = ctx.saved_tensors
        grad_x_hat = err * (g * (-2.0 / err.numel()))
        grad_x = -grad_x_hat if ctx.needs_input_grad[0] else None
        return grad_x, grad_x_hat


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over all entries of (x - x_hat)^2, the residual x - x_hat (no gradient))."""
    return SquaredError.apply(x, x_hat)


def mean_square(t: torch.Tensor) -> torch.Tensor:
    """Mean of t's squared entries as one dot product (no squared temporary)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat) / flat.numel()
