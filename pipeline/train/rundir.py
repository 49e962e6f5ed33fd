"""The run folder of `pipeline train`: checked (read-only) before anything is written, created
with its train_config.json only once every setting has passed, matched on --resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.paths import check_writable
from pipeline.run import RunDir, absolute_cache
from pipeline.train.config import TrainConfig


def check_run_dir(cfg: TrainConfig, manifest) -> Path | None:
    """Check, writing nothing, that --out is new or holds this run (with --resume); returns the
    checkpoint to resume from. The cache is matched by resolved path or cache id, and the run by
    its folder (not by the --out text), so `./x` and `x`, or a moved run folder, are the same."""
    run = RunDir(cfg.out)
    if run.config.is_file():
        old = run.read_config(advice="this run cannot be resumed; choose another --out")
        if not cfg.resume:
            raise PipelineError(f"run folder {run} already holds a run: pass --resume to "
                                "continue it, or choose another --out")
        mine = cfg.identity()
        # a setting added after the run was saved is what that run had: its default
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        changed = sorted(k for k in mine if k not in ("out", "cache")
                         and old.get(k, defaults.get(k)) != mine[k])
        if not _same_cache(old, cfg.cache, manifest):
            changed.append("cache")
        if changed:
            raise PipelineError(f"cannot resume {run}: settings differ from the saved run in "
                                f"{', '.join(changed)}; use the original settings or another --out")
        checkpoints = run.checkpoints()
        return checkpoints[-1] if checkpoints else None
    if run.path.exists() and (not run.path.is_dir() or any(run.path.iterdir())):
        raise PipelineError(f"--out {run} exists and is not a run folder of ours; "
                            "choose another --out")
    check_writable(run.path, flag="--out")
    return None


def create_run_dir(cfg: TrainConfig, manifest) -> None:
    """Write train_config.json, unless the run is resumed."""
    run = RunDir(cfg.out)
    if not run.config.is_file():
        run.write_config(cfg.identity(), manifest.cache_id, manifest.model_fingerprint)


def _same_cache(old: dict, cache: str, manifest) -> bool:
    """Same path once resolved (a changed cache there is caught by the checkpoint's cache id),
    or the same cache id at another path (a moved cache)."""
    same_path = absolute_cache(str(old.get("cache"))) == absolute_cache(cache)
    return same_path or old.get("cache_id") == manifest.cache_id
