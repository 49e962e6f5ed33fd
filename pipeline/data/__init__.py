"""The training data loader: chunk reads, the shuffle, batches on the device."""

from pipeline.data.loader import ActivationLoader

__all__ = ["ActivationLoader"]
