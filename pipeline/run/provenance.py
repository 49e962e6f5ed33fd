"""Which cache a saved SAE reads, and whether a cache fits it: the SAE's hook must be in the
cache and its width the cache's; the model (fingerprint) must be the run's, while a different
cache id of the same model only earns a warning."""

from __future__ import annotations

import sys
from pathlib import Path

from cache_schema import Manifest
from pipeline.errors import PipelineError
from pipeline.run.folder import RunDir


def check_sae_fits_cache(sae_cfg: dict, m: Manifest, cache: str) -> int:
    """The SAE's layer, after checking that its hook and width match the cache."""
    hook = sae_cfg.get("metadata", {}).get("hook_name")
    layer = RunDir.layer_of(hook)
    if hook not in m.hooks:
        raise PipelineError(f"the SAE reads {hook}, but cache {cache} holds {', '.join(m.hooks)}: "
                            "pass the cache it was trained on with --cache")
    if sae_cfg["d_in"] != m.d_model:
        raise PipelineError(f"the SAE's d_in is {sae_cfg['d_in']}, but cache {cache} has d_model "
                            f"{m.d_model}: they come from different models")
    return layer


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
