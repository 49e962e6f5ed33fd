"""Which cache a saved run reads, and whether a cache is the one it was trained on: same model
(fingerprint) is required, a different cache id of the same model only earns a warning."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cache_schema import Manifest
from pipeline.errors import PipelineError

RUN_CONFIG = "train_config.json"


def run_config(sae_dir: Path) -> dict:
    """The run's train_config.json ({} when the folder is a bare SAE)."""
    path = sae_dir / RUN_CONFIG
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise PipelineError(f"{path} is not valid JSON ({e}): the run folder is damaged; "
                            "restore the file from a copy of the run") from e


def run_cache(sae_dir: Path, run: dict, cache: str | None) -> str:
    """--cache, else the run's cache: absolute in runs written since issue 15, as typed (so
    relative to the working folder) in older ones."""
    cache = cache or run.get("cache")
    if not cache:
        raise PipelineError(f"{sae_dir} does not say which cache it was trained on: pass --cache")
    return str(cache)


def check_cache_source(sae_dir: Path, run: dict, sae_cfg: dict, m: Manifest,
                       cache: str) -> None:
    """Refuse a cache made by another model than the run's; warn (naming both ids) when it is
    another cache of the same model. Older runs without the fingerprint only get the id check."""
    fingerprint = run.get("model_fingerprint")
    if fingerprint and fingerprint != m.model_fingerprint:
        raise PipelineError(
            f"cache {cache} was made by another model (fingerprint {m.model_fingerprint[:12]}) "
            f"than the one {sae_dir} was trained on ({fingerprint[:12]}): pass a cache of "
            "that model with --cache")
    trained_on = run.get("cache_id") or sae_cfg.get("metadata", {}).get("cache_id")
    if trained_on and trained_on != m.cache_id:
        print(f"warning: {sae_dir} was trained on cache {trained_on}, but {cache} is cache "
              f"{m.cache_id} (same model, other data or settings)", file=sys.stderr)
