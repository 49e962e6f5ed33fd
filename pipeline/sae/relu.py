"""The standard SAE: z = relu(W_enc^T (x - b_dec) + b_enc), l1 on mean |z|."""

from __future__ import annotations

import torch

from pipeline.sae.base import SAE


class ReluSAE(SAE):
    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)
