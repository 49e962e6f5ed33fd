"""SAE architectures, registered by name with their config class; training and inference look
them up here and never branch on the name. A new architecture is one file plus one line below."""

from pipeline.sae.base import SAE, SAEConfig
from pipeline.sae.gated import GatedConfig, GatedSAE
from pipeline.sae.masked import MaskedConfig, MaskedSAE
from pipeline.sae.registry import (
    ARCHITECTURES,
    architecture,
    build_sae,
    register_sae_class,
    sae_config,
)
from pipeline.sae.relu import L1Config, ReluSAE
from pipeline.sae.topk import BatchTopKConfig, BatchTopKSAE, TopKConfig, TopKSAE

register_sae_class("relu", ReluSAE, L1Config)
register_sae_class("masked", MaskedSAE, MaskedConfig)
register_sae_class("gated", GatedSAE, GatedConfig)
register_sae_class("topk", TopKSAE, TopKConfig)
register_sae_class("batchtopk", BatchTopKSAE, BatchTopKConfig)

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "architecture", "build_sae",
           "register_sae_class", "sae_config"]
