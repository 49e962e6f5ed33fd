"""Sizing: cache bytes, memory and time of extraction and training, from a model's config."""
