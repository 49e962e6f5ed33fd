"""k-sparse SAEs: TopK (k latents per token) and BatchTopK (k x batch latents per batch), both
with the auxiliary loss of Gao et al. (2024) that reconstructs the residual from dead latents."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from pipeline.sae.base import SAE, SAEConfig
from pipeline.sae.mse import squared_error
from pipeline.sae.sparse import SparseCode, SparseEncode, sparse_decode
from pipeline.sae.workspace import Workspace


def keep_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Zeros except the k largest entries of each row (fixed shapes). Applied to relu(pre), a
    row with fewer than k positive entries keeps them all and zeros: at most k nonzeros."""
    top, idx = values.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(values).scatter_(-1, idx, top)


# Steps between two host-side checks for dead latents (the AuxK loss runs only while some are).
DEAD_CHECK_EVERY = 25


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32
    """Active latents per token (topk; batchtopk: on average)."""
    aux_k: int = 256
    """topk/batchtopk: dead latents used by the auxiliary loss."""
    aux_coeff: float = 1 / 32
    """topk/batchtopk: coefficient of the auxiliary loss."""
    sparse: bool = True
    """topk: the k-sparse step (decoder and encoder gradients only through the active latents);
    --no-sparse runs the dense reference."""

    RANGES: ClassVar[dict[str, tuple]] = {
        "k": (1, None, True), "aux_k": (1, None, True), "aux_coeff": (0, None, True)}

    def problems(self) -> list[str]:
        problems = super().problems()
        if not 1 <= self.k <= self.d_sae:
            problems.append(f"k must be between 1 and d_sae ({self.d_sae}), got k={self.k}")
        if self.aux_k < 1:
            problems.append(f"aux_k must be at least 1, got {self.aux_k}")
        if not self.aux_coeff >= 0:
            problems.append(f"aux_coeff must be non-negative, got {self.aux_coeff}")
        return problems


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_momentum: float = field(default=0.99, metadata={"flag": False})
    """Momentum of the running inference threshold."""

    def problems(self) -> list[str]:
        problems = super().problems()
        if not 0 <= self.threshold_momentum < 1:
            problems.append(f"threshold_momentum must be in [0, 1), got "
                            f"{self.threshold_momentum}")
        return problems


class TopKSAE(SAE):
    saelens_architecture = "topk"
    uses_l1 = False
    saved_fields = ("k",)
    independent_latents = False  # which k latents are kept depends on all of them
    per_row = True  # k latents per row (BatchTopK: k * B per batch)

    def __init__(self, cfg, generator=None):
        super().__init__(cfg, generator)
        # Whether the AuxK loss runs: a host-side switch (the step is captured once per value),
        # kept as a buffer so that a resumed run continues with the same value.
        self.register_buffer("aux_on", torch.zeros((), dtype=torch.bool))
        self.aux_active = False
        self.workspace = Workspace()
        self.register_load_state_dict_post_hook(
            lambda module, _keys: setattr(module, "aux_active", bool(module.aux_on)))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return keep_topk(torch.relu(pre), self.cfg.k)

    def refresh(self, step: int) -> None:
        if step % DEAD_CHECK_EVERY == 0:
            self.check_dead()

    def check_dead(self) -> None:
        """Turn the AuxK loss on while some latent is dead, off otherwise (one host sync)."""
        with torch.no_grad():
            self.aux_on.copy_(self.dead_mask().any())
        self.aux_active = bool(self.aux_on)

    def graph_key(self) -> bool:
        return self.aux_active

    def extra_loss(self, x, x_hat, pre, z, l1_scale):
        """AuxK (Gao et al. 2024, as in openai/sparse_autoencoder): the aux_k largest ReLU'd
        pre-activations among dead latents only (live ones masked to -inf, so fixed shapes)
        reconstruct the detached residual e = x - x_hat through W_dec (no bias); the squared
        error is divided by the variance of e (mean over batch x d_in of (e - mean e)^2) and
        multiplied by aux_coeff. Computed only while `aux_active` (some latent was dead at the
        last check, every DEAD_CHECK_EVERY steps), and multiplied by any(dead) so it is exactly
        0 when none is dead now; aux_k above d_sae means all latents. SAELens differs: no
        variance normalisation, no ReLU, k_aux = d_in // 2 scaled by n_dead / k_aux."""
        if not self.aux_active:
            return {"aux": x.new_zeros(())}
        dead = self.dead_mask()
        err = (x - x_hat).detach()
        aux_pre = torch.relu(pre.masked_fill(~dead, float("-inf")))
        err_hat = keep_topk(aux_pre, self.aux_k()) @ self.W_dec
        return {"aux": self._aux_loss(err, err_hat, dead)}

    def aux_k(self) -> int:
        return min(self.cfg.aux_k, self.cfg.d_sae)

    def _aux_loss(self, err, err_hat, dead):
        with torch.no_grad():  # err is detached: the variance is a constant, over the whole batch
            var = self.ranks.mean_((err - self.ranks.mean_(err.mean(0))).pow(2).mean())
        nmse = (err_hat - err).pow(2).mean() / var.clamp_min(1e-12)
        return self.cfg.aux_coeff * nmse * dead.any().float()

    def loss(self, x, l1_scale):
        """The k-sparse step (pipeline.sae.sparse) unless cfg.sparse is False; the same loss,
        gradients and statistics as the dense reference (tested). Its code is a SparseCode."""
        if not self.cfg.sparse:
            return super().loss(x, l1_scale)
        dead = self.dead_mask() if self.aux_active else None
        out = SparseEncode.apply(x, self.W_enc, self.b_enc, self.b_dec, self.cfg.k,
                                 self.per_row, dead, self.aux_k(), self.workspace, self.ranks)
        code = SparseCode(*out[:4], d_sae=self.cfg.d_sae)
        x_hat = sparse_decode(code, self.W_dec) + self.b_dec
        mse, err = squared_error(x, x_hat)
        parts = {"mse": mse, "aux": x.new_zeros(())}
        if dead is not None:
            aux = SparseCode(*out[4:], d_sae=self.cfg.d_sae)
            parts["aux"] = self._aux_loss(err, sparse_decode(aux, self.W_dec), dead)
        with torch.no_grad():
            self.count_firing(code.fired(), len(x))
            self.update_stats(code.vals)
        return sum(parts.values()), parts, x_hat, code

    def saelens_export(self, scale):
        tensors, cfg = super().saelens_export(scale)
        return tensors, {**cfg, "k": self.cfg.k}

    @staticmethod
    def saved_activation(saved, pre, latents):
        """SAELens's TopK: the k largest of each row, then ReLU (the same as keep_topk of the
        ReLU'd row)."""
        return keep_topk(torch.relu(pre), int(saved.cfg["k"]))


class BatchTopKSAE(TopKSAE):
    """Training keeps the k*B largest activations of the whole batch; inference uses a running
    threshold (EMA of the smallest activation kept), so it is saved as SAELens `jumprelu`."""

    saelens_architecture = "jumprelu"
    per_row = False
    saved_tensors = (*SAE.saved_tensors, "threshold")
    saved_fields = ()
    independent_latents = True

    def __init__(self, cfg, generator=None):
        super().__init__(cfg, generator)
        self.register_buffer("threshold", torch.zeros(()))

    def train_activation(self, pre: torch.Tensor) -> torch.Tensor:
        acts = torch.relu(pre)
        flat = keep_topk(acts.reshape(1, -1), self.cfg.k * acts.shape[0])
        return flat.reshape(acts.shape)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold)

    def update_stats(self, z: torch.Tensor) -> None:
        """z: the training latents, or only the values of the active ones (sparse step)."""
        smallest = self.ranks.min_(z.masked_fill(z <= 0, float("inf")).min())
        smallest = torch.where(torch.isfinite(smallest), smallest, self.threshold)
        m = self.cfg.threshold_momentum
        self.threshold.mul_(m).add_(smallest, alpha=1 - m)

    def saelens_export(self, scale):
        tensors, cfg = SAE.saelens_export(self, scale)
        threshold = self.threshold.detach().float().cpu() / scale  # latents are z / scale
        tensors["threshold"] = threshold.expand(self.cfg.d_sae).clone()
        return tensors, cfg

    @staticmethod
    def saved_activation(saved, pre, latents):
        """SAELens's JumpReLU: relu(pre) where pre > relu(threshold)."""
        threshold = saved.threshold if latents is None else saved.threshold[latents]
        return torch.relu(pre) * (pre > threshold.relu())
