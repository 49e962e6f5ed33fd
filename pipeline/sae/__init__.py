"""SAE architectures, registered by name; the trainer looks them up here and never branches on
the name. A new architecture is one file plus one line in REGISTRY."""

from pipeline.sae.base import SAE, SAEConfig
from pipeline.sae.gated import GatedSAE
from pipeline.sae.masked import MaskedSAE
from pipeline.sae.relu import ReluSAE
from pipeline.sae.topk import BatchTopKSAE, TopKSAE

REGISTRY: dict[str, type[SAE]] = {
    "relu": ReluSAE,
    "masked": MaskedSAE,
    "gated": GatedSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
}


def build_sae(cfg: SAEConfig, generator=None) -> SAE:
    """A freshly initialised SAE of cfg.arch (deterministic given the generator)."""
    if cfg.arch not in REGISTRY:
        raise ValueError(f"unknown architecture {cfg.arch!r} (known: {', '.join(REGISTRY)})")
    return REGISTRY[cfg.arch](cfg, generator)


__all__ = ["REGISTRY", "SAE", "SAEConfig", "build_sae"]
