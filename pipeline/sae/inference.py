"""A saved SAE at inference: its tensors applied to raw activations as SAELens 6 computes its
architecture (pipeline.run.saelens reads one from disk)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.sae.base import SAE


class InferenceSAE(nn.Module):
    """A saved SAE applied to raw activations, computed as SAELens 6 computes its architecture;
    the latents come from the class it was trained as (`kind.saved_activation`)."""

    def __init__(self, cfg: dict, tensors: dict[str, torch.Tensor], kind: type[SAE]):
        super().__init__()
        self.cfg = cfg
        self.kind = kind
        self.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", True))
        for name, t in tensors.items():
            self.register_buffer(name, t)

    def encode(self, x: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [rows, d_sae], or only the columns `latents`: computed from those encoder
        columns alone where each latent depends on its own column only."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if latents is not None and self.kind.independent_latents:
            pre = x @ self.W_enc[:, latents] + self.b_enc[latents]
            return self.kind.saved_activation(self, pre, latents)
        z = self.kind.saved_activation(self, x @ self.W_enc + self.b_enc, None)
        return z if latents is None else z[:, latents]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
