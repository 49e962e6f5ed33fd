"""The dormancy-mask SAE of the source article, with its defects fixed.

- Statistics are taken on the latents z (the article's forward hook read x_hat): per latent, an
  EMA of the batch mean of |z| (momentum 0.99).
- Every `mask_every` steps, outside the training step, the mask M = [EMA < eps] is refreshed.
- Loss = mse + l1 * mean|z| + absorption * penalty(M, ||W_dec_i||), where the penalty is
  - "shrink": mean(M * ||W_dec_i||), the article's term. Its comment says it restores low norms;
    it does the opposite: it pushes the decoder rows of dormant latents toward zero.
  - "restore": mean(M * (1 - ||W_dec_i||)^2), which pulls those norms back toward 1.
  - "off": no penalty (mask statistics are still reported).
  With rows renormalised to unit norm after every step, the gradient of either term with respect
  to W_dec_i is radial (parallel to W_dec_i), so plain SGD's effect would be undone entirely by
  the renormalisation. What survives is Adam's per-coordinate scaling, which turns the radial
  gradient into a small non-radial update that rotates dormant rows; expect a weak effect, and
  compare against "off" (the mask density is logged so the audit can check it).
"""

from __future__ import annotations

import torch

from pipeline.sae.relu import ReluSAE


class MaskedSAE(ReluSAE):
    def __init__(self, cfg, generator=None):
        super().__init__(cfg, generator)
        self.register_buffer("ema", torch.ones(cfg.d_sae))
        self.register_buffer("mask", torch.zeros(cfg.d_sae))

    def extra_loss(self, x, x_hat, pre, z, l1_scale):
        out = super().extra_loss(x, x_hat, pre, z, l1_scale)
        if self.cfg.penalty == "off":
            return out
        norms = self.W_dec.norm(dim=1)
        term = norms if self.cfg.penalty == "shrink" else (1 - norms).pow(2)
        out["penalty"] = self.cfg.absorption * (self.mask * term).mean()
        return out

    def update_stats(self, z: torch.Tensor) -> None:
        m = self.cfg.mask_momentum
        self.ema.mul_(m).add_(z.abs().mean(dim=0), alpha=1 - m)

    @torch.no_grad()
    def refresh(self, step: int) -> None:
        if step % self.cfg.mask_every == 0:
            self.mask.copy_((self.ema < self.cfg.mask_eps).float())

    def mask_density(self) -> torch.Tensor:
        return self.mask.mean()
