"""The standard SAE: z = relu(W_enc^T (x - b_dec) + b_enc), l1 on mean |z|."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pipeline.sae.base import SAE, SAEConfig
from pipeline.sae.dense import DenseReLU
from pipeline.sae.mse import squared_error
from pipeline.sae.workspace import Workspace


@dataclass
class L1Config(SAEConfig):
    """The l1 family (relu, masked, gated)."""

    l1: float = 1e-3
    """Sparsity coefficient on mean |z| (relu, masked, gated)."""
    l1_warmup_steps: int = 0
    """Steps over which the sparsity coefficient ramps linearly from 0 to --l1."""

    RANGES: ClassVar[dict[str, tuple]] = {"l1": (0, None, True), "l1_warmup_steps": (0, None, True)}

    def problems(self) -> list[str]:
        problems = super().problems()
        if not self.l1 >= 0:
            problems.append(f"l1 must be non-negative, got {self.l1}")
        return problems


class ReluSAE(SAE):
    def __init__(self, cfg, generator=None):
        super().__init__(cfg, generator)
        self.workspace = Workspace()
        self.counts = torch.zeros(cfg.d_sae)  # rows where each latent fired, in the last loss()

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def loss(self, x, l1_scale):
        """The same loss, gradients and statistics as SAE.loss (tested), through DenseReLU:
        fewer passes over the [B, d_sae] latents, and no new buffers for them."""
        x_hat, colsum, z, self.counts = DenseReLU.apply(x, self.W_enc, self.b_enc, self.b_dec,
                                                        self.W_dec, self.workspace)
        parts = {"mse": squared_error(x, x_hat)[0],
                 "sparsity": self.l1_term(colsum.sum(), z.numel(), l1_scale),
                 **self.weight_terms()}
        with torch.no_grad():
            self.count_firing(colsum > 0, len(x))  # z >= 0: fired iff its sum is positive
            self.latent_means(colsum / len(x))
        return sum(parts.values()), parts, x_hat, z

    def latent_means(self, means: torch.Tensor) -> None:
        """In-step statistics from each latent's batch mean of |z|, which the dense ReLU step
        (pipeline.sae.dense) passes instead of z (masked: the EMA)."""

    def l0(self, code: torch.Tensor) -> torch.Tensor:
        return self.counts.sum() / len(code)  # counted in the forward: no pass over z here
