"""The dormancy-mask SAE of the source article, with its defects fixed.

- Statistics are taken on the latents z (the article's forward hook read x_hat): per latent, an
  EMA of the batch mean of |z| (momentum 0.99), starting at 1 (no latent is dormant until the
  data say so).
- Every `mask_every` steps, outside the training step, the mask M = [EMA < eps] is refreshed.
- Loss = mse + l1 * l1_scale * mean|z| + absorption * penalty, with the penalty a mean over the
  d_sae latents of
  - "shrink": M * ||W_dec_i||, the article's term. Its comment says it restores low norms; its
    gradient points the other way, toward smaller norms.
  - "restore": M * (1 - ||W_dec_i||)^2, which points back toward norm 1.
  - "off": no penalty (the mask and its density are still computed and reported).

With decoder rows renormalised after every step, either penalty's gradient on a dormant row is
radial, so "restore" does nothing (its gradient is 0 at norm 1) and "shrink" acts only through
Adam's per-coordinate scaling, which zeroes the row's small coordinates (tests/test_sae.py):
an optimiser artefact, not a restoring force. Compare against "off" before crediting either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from pipeline.sae.relu import L1Config, ReluSAE

PENALTIES = ("shrink", "restore", "off")


@dataclass
class MaskedConfig(L1Config):
    absorption: float = 5e-4
    """masked: coefficient of the decoder-norm penalty on masked (dormant) latents."""
    penalty: str = "shrink"
    """masked: penalty direction: shrink (the article's term), restore, or off."""
    mask_every: int = 500
    """masked: refresh the dormancy mask every N steps."""
    mask_eps: float = 1e-4
    """masked: a latent whose EMA of mean |z| is below this is masked (5e-5 for early layers)."""
    mask_momentum: float = field(default=0.99, metadata={"flag": False})
    """Momentum of the EMA of each latent's mean |z|."""

    RANGES: ClassVar[dict[str, tuple]] = {
        "absorption": (0, None, True), "mask_every": (1, None, True), "mask_eps": (0, None, True)}

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.penalty not in PENALTIES:
            problems.append(f"unknown penalty {self.penalty!r} (known: {', '.join(PENALTIES)})")
        if self.mask_every < 1:
            problems.append(f"mask_every must be at least 1, got {self.mask_every}")
        for name in ("absorption", "mask_eps"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be non-negative, got {getattr(self, name)}")
        if not 0 <= self.mask_momentum < 1:
            problems.append(f"mask_momentum must be in [0, 1), got {self.mask_momentum}")
        return problems


class MaskedSAE(ReluSAE):
    has_mask = True

    def __init__(self, cfg, generator=None):
        super().__init__(cfg, generator)
        self.register_buffer("ema", torch.ones(cfg.d_sae))
        self.register_buffer("mask", torch.zeros(cfg.d_sae))

    def weight_terms(self):
        if self.cfg.penalty == "off":
            return {}
        norms = self.W_dec.norm(dim=1)
        term = norms if self.cfg.penalty == "shrink" else (1 - norms).pow(2)
        return {"penalty": self.cfg.absorption * (self.mask * term).mean()}

    def update_stats(self, z: torch.Tensor) -> None:
        self.latent_means(z.abs().mean(dim=0))

    def latent_means(self, means: torch.Tensor) -> None:
        m = self.cfg.mask_momentum
        means = self.ranks.mean_(means)  # equal slices: the mean of the means is the batch's
        self.ema.mul_(m).add_(means, alpha=1 - m)

    @torch.no_grad()
    def refresh(self, step: int) -> None:
        if step % self.cfg.mask_every == 0:
            self.mask.copy_((self.ema < self.cfg.mask_eps).float())

    def mask_density(self) -> torch.Tensor:
        return self.mask.mean()
