"""The pipeline's home folder: converted models, file digests, compiled kernels, remote mirrors."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """Where converted models are kept (PIPELINE_HOME, else ~/.cache/pipeline)."""
    return Path(os.environ.get("PIPELINE_HOME", Path.home() / ".cache" / "pipeline"))
