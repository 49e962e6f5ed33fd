"""Adaptive gates (the article's second method): gate_i = sigmoid(g_i), g initialised at 2.0,
z = relu(gate * pre), plus gate_reg times the mean binary entropy of the gates, which pushes
each gate toward 0 or 1. At inference the positive gate folds into the encoder, so the saved SAE
is a standard one (not SAELens's `gated` architecture, which is a different method)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from pipeline.sae.base import SAE
from pipeline.sae.relu import L1Config


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


@dataclass
class GatedConfig(L1Config):
    gate_reg: float = 1e-4
    """gated: coefficient of the mean binary entropy of the gates."""
    gate_init: float = field(default=2.0, metadata={"flag": False})
    """Initial gate logit g (gate = sigmoid(g))."""

    RANGES: ClassVar[dict[str, tuple]] = {"gate_reg": (0, None, True)}

    def problems(self) -> list[str]:
        problems = super().problems()
        if not self.gate_reg >= 0:
            problems.append(f"gate_reg must be non-negative, got {self.gate_reg}")
        return problems


class GatedSAE(SAE):
    def __init__(self, cfg, generator=None):
        super().__init__(cfg, generator)
        self.g = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.gate_init)))

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.g)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.gates() * pre)

    def weight_terms(self):
        return {"gate_entropy": self.cfg.gate_reg * binary_entropy(self.gates()).mean()}

    def export_encoder(self):
        gate = self.gates()
        return self.W_enc * gate, self.b_enc * gate
