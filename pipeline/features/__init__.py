"""Offline feature browser: per-latent statistics over held-out cache chunks as a static site."""
