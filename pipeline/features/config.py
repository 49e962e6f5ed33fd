"""FeaturesConfig: the settings of `pipeline features`; its arguments and options are generated
from these fields (help texts are the field docstrings)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class FeaturesConfig:
    sae_dir: Path
    """Folder with cfg.json + sae_weights.safetensors."""
    cache: str | None = None
    """Cache to read (default: the run's)."""
    latents: str | None = None
    """Latents: '0-511', '3,17,40-49' or 'all' (default: the first 512)."""
    examples: int = 20
    """Top activating examples per latent."""
    context: int = 8
    """Tokens of context either side of an example."""
    out: Path | None = None
    """Site folder (default: SAE_DIR/features)."""
    tokens: int | None = None
    """Scan at most this many held-out tokens."""
    holdout_chunks: int | None = None
    """Read the cache's last N chunks (default: the run's held-out chunks)."""
    model: str | None = None
    """The model that made the cache, if it cannot be found from the manifest."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        self.sae_dir = Path(self.sae_dir)
