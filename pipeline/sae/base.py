"""SAEConfig and the SAE base class every architecture extends.

Loss reductions follow the source article's code (its formula writes sums; its code takes means,
and the coefficients l1=1e-3, absorption=5e-4 were tuned for the means):
- mse: mean over batch x d_in of (x - x_hat)^2;
- sparsity: l1 * l1_scale * mean over batch x d_sae of |z|;
- masked penalty, gated entropy: means over the d_sae latents.
Every method used inside a training step is CUDA-graph capturable: no host sync, no
data-dependent shapes, no Python branch on a tensor's value, buffers updated in place.
tokens_since_fired is int64, so the count stays exact however long a latent stays silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pipeline.processes import ALONE, Workers
from pipeline.sae.mse import squared_error
from pipeline.sae.sparse import mean_l0


@dataclass
class SAEConfig:
    """Settings every architecture has; each architecture's config class adds its own, with a
    docstring (the flag's help) and a range in RANGES (checked by TrainConfig, naming the flag)."""

    arch: str
    """The registered name of the architecture."""
    d_in: int
    """Width of the input activations (d_model)."""
    d_sae: int
    """Number of latents."""
    dead_tokens: int = 2_000_000
    """A latent that has not fired in this many training tokens counts as dead."""

    RANGES: ClassVar[dict[str, tuple]] = {"dead_tokens": (1, None, True)}

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid SAE config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with the settings (subclasses add their own checks)."""
        problems = []
        if self.d_in < 1 or self.d_sae < 1:
            problems.append(f"d_in and d_sae must be at least 1, got d_in={self.d_in}, "
                            f"d_sae={self.d_sae}")
        if self.dead_tokens < 1:
            problems.append(f"dead_tokens must be at least 1, got {self.dead_tokens}")
        return problems


class SAE(nn.Module):
    """Linear encoder, nonlinearity, linear decoder with unit-norm rows.

    Subclasses define `activation(pre)` (training-time latents) and may add loss terms
    (`extra_loss`), in-step statistics (`update_stats`) and SAELens export details."""

    saelens_architecture = "standard"
    uses_l1 = True  # trained with the l1 penalty on mean |z|
    has_mask = False  # keeps a dormancy mask (its density is reported)
    # Saved (SAELens) form: its tensors, the integer cfg.json fields it needs, and whether a
    # latent's activation depends on its own encoder column only (features encodes a subset).
    saved_tensors = ("W_enc", "W_dec", "b_enc", "b_dec")
    saved_fields: tuple[str, ...] = ()
    independent_latents = True

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        w = torch.randn(cfg.d_sae, cfg.d_in, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.int64))
        # The processes sharing each batch in data-parallel training: statistics over the
        # batch (firing, EMAs, thresholds) reduce over all of them.
        self.ranks: Workers = ALONE

    # -- forward --------------------------------------------------------------------------------
    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """W_enc^T (x - b_dec) + b_enc, written as x W_enc - b_dec W_enc + b_enc: the same
        value, but b_dec's gradient then costs a matrix-vector product, not a fourth
        batch-sized matmul in the backward pass."""
        return torch.addmm(self.b_enc - self.b_dec @ self.W_enc, x, self.W_enc)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train_activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Latents during training (batchtopk differs from inference)."""
        return self.activation(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents at inference (equal to training-time latents except for batchtopk)."""
        return self.activation(self.pre_activation(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- training -------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, l1_scale: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(total loss, its parts, x_hat, z) of a training batch; updates the statistics."""
        pre = self.pre_activation(x)
        z = self.train_activation(pre)
        x_hat = self.decode(z)
        parts = {"mse": squared_error(x, x_hat)[0]}
        parts.update(self.extra_loss(x, x_hat, pre, z, l1_scale))
        with torch.no_grad():
            self.count_firing(z.amax(dim=0) > 0, len(z))  # z >= 0: one reduction, no mask
            self.update_stats(z)
        return sum(parts.values()), parts, x_hat, z

    def extra_loss(self, x, x_hat, pre, z, l1_scale) -> dict[str, torch.Tensor]:
        """Loss terms besides the reconstruction (default: l1 on mean |z|, plus weight_terms).
        Every architecture's latents are ReLU outputs, z >= 0, so mean z is mean |z| without
        abs's forward and backward passes over the [B, d_sae] latents."""
        return {"sparsity": self.l1_term(z.sum(), z.numel(), l1_scale), **self.weight_terms()}

    def l1_term(self, z_sum: torch.Tensor, numel: int, l1_scale: torch.Tensor) -> torch.Tensor:
        # a scaled sum, not a mean: mean's backward divides a whole [B, d_sae] tensor
        return self.cfg.l1 * l1_scale / numel * z_sum

    def weight_terms(self) -> dict[str, torch.Tensor]:
        """Loss terms on the parameters alone (masked: decoder-norm penalty; gated: entropy)."""
        return {}

    def count_firing(self, fired: torch.Tensor, n_tokens: int) -> None:
        """After a batch of n_tokens (this process's rows) in which the latents `fired` ([d_sae]
        bool) were active."""
        fired = self.ranks.any_(fired)
        self.tokens_since_fired.add_(n_tokens * self.ranks.world)
        self.tokens_since_fired.masked_fill_(fired, 0)

    def l0(self, code) -> torch.Tensor:
        """Mean active latents per row of the code that the last loss() returned."""
        return mean_l0(code)

    def update_stats(self, z: torch.Tensor) -> None:
        """In-step statistics from the latents (no grad, in place)."""

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def refresh(self, step: int) -> None:
        """Outside the graph, after `step` steps are done (masked: the dormancy mask)."""

    def graph_key(self) -> object:
        """The host-side state a training step depends on: the step is captured once per value
        (topk, batchtopk: whether the AuxK loss runs)."""
        return None

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def mask_density(self) -> torch.Tensor:
        return torch.zeros((), device=self.W_dec.device)

    # -- export ---------------------------------------------------------------------------------
    @torch.no_grad()
    def saelens_export(self, scale: float) -> tuple[dict[str, torch.Tensor], dict]:
        """SAELens tensors and cfg fields with the input scaling folded into the biases: applied
        to raw x, the export gives z(raw x) = z(scale * x) / scale and x_hat(raw x) =
        x_hat(scale * x) / scale. Every activation is positively homogeneous, so the weights stay
        as trained and W_dec keeps its unit-norm rows, which SAEBench's metrics assume."""
        w_enc, b_enc = self.export_encoder()
        tensors = {"W_enc": w_enc, "W_dec": self.W_dec, "b_enc": b_enc / scale,
                   "b_dec": self.b_dec / scale}
        return ({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                {"architecture": self.saelens_architecture})

    def export_encoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.W_enc, self.b_enc

    @staticmethod
    def saved_activation(saved, pre: torch.Tensor, latents: torch.Tensor | None) -> torch.Tensor:
        """Latents of a saved SAE (pipeline.sae.inference.InferenceSAE) from its pre-activations, as
        SAELens 6 computes them; `latents`: the columns of pre, when only some were computed."""
        return torch.relu(pre)
