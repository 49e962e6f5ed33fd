"""Reconstruction metrics of a saved SAE on raw activations: MSE, fraction of variance explained,
L0, and per-latent firing frequencies (dead = never fires on the evaluation tokens; dense = fires
on more than DENSE_FREQ of them)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

DENSE_FREQ = 0.1


@torch.no_grad()
def reconstruction_metrics(sae, batches: Iterable[torch.Tensor]) -> tuple[dict, torch.Tensor]:
    """Metrics over all batches (raw activation space) and the firing frequency of each latent."""
    n = 0
    err = l0 = 0.0
    sum_x = sum_x2 = fired = None
    for x in batches:
        x = x.float()
        z = sae.encode(x)
        err += float((x - sae.decode(z)).pow(2).sum())
        active = (z != 0)
        l0 += float(active.sum())
        counts = active.sum(0, dtype=torch.float64)
        fired = counts if fired is None else fired + counts
        sx, sx2 = x.sum(0, dtype=torch.float64), x.pow(2).sum(0, dtype=torch.float64)
        sum_x = sx if sum_x is None else sum_x + sx
        sum_x2 = sx2 if sum_x2 is None else sum_x2 + sx2
        n += x.shape[0]
    if n == 0:
        raise ValueError("no evaluation tokens")
    var = float((sum_x2 - sum_x.pow(2) / n).sum())
    freq = (fired / n).float()
    d_in = sum_x.numel()
    return {
        "tokens": n, "mse": err / (n * d_in), "fve": 1.0 - err / var, "l0": l0 / n,
        "dead_fraction": float((freq == 0).float().mean()),
        "dense_fraction": float((freq > DENSE_FREQ).float().mean()),
        "dense_threshold": DENSE_FREQ,
    }, freq
