"""Activation-cache pipeline: extract clean and masked activations, train masked SAEs."""

__version__ = "0.1.0"
