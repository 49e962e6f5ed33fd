"""EvalConfig: the settings of `pipeline eval`; its arguments and options are generated from these
fields (help texts are the field docstrings)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache_schema import STREAMS
from pipeline.errors import PipelineError


@dataclass
class EvalConfig:
    sae_dir: Path
    """Folder with cfg.json + sae_weights.safetensors."""
    cache: str | None = None
    """Cache to evaluate on (default: the run's)."""
    holdout_chunks: int | None = None
    """Evaluate on the cache's last N chunks (default: the run's held-out chunks)."""
    stream: str = "clean"
    """clean or masked activations."""
    ce_sequences: int = 16
    """Held-out sequences for the spliced cross-entropy (0 skips it and does not load the
    model)."""
    model: str | None = None
    """The model that made the cache, if it cannot be found from the manifest."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    absorption: bool = False
    """Also measure first-letter absorption (SAEBench's task; minutes on CPU)."""
    absorption_every: int = 8
    """Absorption: every n-th alphabetic word."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        """The options' ranges, checked before anything is loaded."""
        self.sae_dir = Path(self.sae_dir)
        problems = []
        if self.holdout_chunks is not None and self.holdout_chunks < 1:
            problems.append(f"--holdout-chunks must be at least 1, got {self.holdout_chunks}")
        if self.stream not in STREAMS:
            problems.append(f"--stream must be clean or masked, got {self.stream!r}")
        if self.ce_sequences < 0:
            problems.append(f"--ce-sequences must be at least 0 (0 skips the cross-entropy), "
                            f"got {self.ce_sequences}")
        if self.absorption_every < 1:
            problems.append(f"--absorption-every must be at least 1, got "
                            f"{self.absorption_every}")
        if problems:
            raise PipelineError("; ".join(problems) + ".")
