"""The standard SAE: z = relu(W_enc^T (x - b_dec) + b_enc), l1 on mean |z|."""

from __future__ import annotations

import torch

from pipeline.sae.base import SAE
from pipeline.sae.dense import DenseReLU
from pipeline.sae.mse import squared_error
from pipeline.sae.workspace import Workspace


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

    def l0(self, code: torch.Tensor) -> torch.Tensor:
        return self.counts.sum() / len(code)  # counted in the forward: no pass over z here
