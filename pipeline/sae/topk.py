"""k-sparse SAEs: TopK (k latents per token) and BatchTopK (k x batch latents per batch), both
with the auxiliary loss of Gao et al. (2024) that reconstructs the residual from dead latents."""

from __future__ import annotations

import torch

from pipeline.sae.base import SAE
from pipeline.sae.sparse import SparseTopK, scatter_dense, sparse_decode


def keep_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Zeros except the k largest entries of each row (fixed shapes). Applied to relu(pre), a
    row with fewer than k positive entries keeps them all and zeros: at most k nonzeros."""
    top, idx = values.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(values).scatter_(-1, idx, top)


class TopKSAE(SAE):
    saelens_architecture = "topk"

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return keep_topk(torch.relu(pre), self.cfg.k)

    def extra_loss(self, x, x_hat, pre, z, l1_scale):
        """AuxK (Gao et al. 2024, as in openai/sparse_autoencoder): the aux_k largest ReLU'd
        pre-activations among dead latents only (live ones masked to -inf, so fixed shapes)
        reconstruct the detached residual e = x - x_hat through W_dec (no bias); the squared
        error is divided by the variance of e (mean over batch x d_in of (e - mean e)^2) and
        multiplied by aux_coeff. Exactly 0 while no latent is dead (a multiplication by
        any(dead), no branch on values); aux_k above d_sae means all latents. SAELens differs:
        no variance normalisation, no ReLU, k_aux = d_in // 2 scaled by n_dead / k_aux."""
        dead = self.dead_mask()
        err = (x - x_hat).detach()
        aux_pre = torch.relu(pre.masked_fill(~dead, float("-inf")))
        k = min(self.cfg.aux_k, self.cfg.d_sae)
        err_hat = keep_topk(aux_pre, k) @ self.W_dec
        nmse = (err_hat - err).pow(2).mean() / (err - err.mean(0)).pow(2).mean().clamp_min(1e-12)
        return {"aux": self.cfg.aux_coeff * nmse * dead.any().float()}

    def loss(self, x, l1_scale):
        """The k-sparse step (pipeline.sae.sparse) unless cfg.sparse is False; same loss,
        gradients and statistics as the dense reference (tested)."""
        if not self.cfg.sparse or type(self) is not TopKSAE:
            return super().loss(x, l1_scale)
        dead = self.dead_mask()
        bias = self.b_enc - self.b_dec @ self.W_enc
        vals, idx, avals, aidx = SparseTopK.apply(x, self.W_enc, bias, self.cfg.k, dead,
                                                  min(self.cfg.aux_k, self.cfg.d_sae))
        x_hat = sparse_decode(vals, idx, self.W_dec) + self.b_dec
        err = (x - x_hat).detach()
        err_hat = sparse_decode(avals, aidx, self.W_dec)
        nmse = (err_hat - err).pow(2).mean() / (err - err.mean(0)).pow(2).mean().clamp_min(1e-12)
        parts = {"mse": (x - x_hat).pow(2).mean(),
                 "aux": self.cfg.aux_coeff * nmse * dead.any().float()}
        z = scatter_dense(vals.detach(), idx, self.cfg.d_sae)
        with torch.no_grad():
            self._count_firing(z)
            self.update_stats(z)
        return sum(parts.values()), parts, x_hat, z

    def saelens_export(self, scale):
        tensors, cfg = super().saelens_export(scale)
        return tensors, {**cfg, "k": self.cfg.k}


class BatchTopKSAE(TopKSAE):
    """Training keeps the k*B largest activations of the whole batch; inference uses a running
    threshold (EMA of the smallest activation kept), so it is saved as SAELens `jumprelu`."""

    saelens_architecture = "jumprelu"

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
        smallest = z.masked_fill(z <= 0, float("inf")).min()
        smallest = torch.where(torch.isfinite(smallest), smallest, self.threshold)
        m = self.cfg.threshold_momentum
        self.threshold.mul_(m).add_(smallest, alpha=1 - m)

    def saelens_export(self, scale):
        tensors, cfg = SAE.saelens_export(self, scale)
        tensors["threshold"] = self.threshold.detach().float().cpu().expand(self.cfg.d_sae).clone()
        return tensors, cfg
