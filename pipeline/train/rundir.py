"""The run folder of `pipeline train`: checked (read-only) before anything is written, created
with its train_config.json only once every setting has passed, matched on --resume."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.paths import check_writable
from pipeline.remote import is_remote
from pipeline.train import checkpoint as ckpt
from pipeline.train.config import TrainConfig

CONFIG_FILE = "train_config.json"


def check_run_dir(cfg: TrainConfig, manifest) -> Path | None:
    """Check, writing nothing, that --out is new or holds this run (with --resume); returns the
    checkpoint to resume from. The cache is matched by resolved path or cache id, and the run by
    its folder (not by the --out text), so `./x` and `x`, or a moved run folder, are the same."""
    run_dir = Path(cfg.out)
    saved = run_dir / CONFIG_FILE
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except ValueError as e:
            raise PipelineError(f"{saved} is not valid JSON ({e}): this run cannot be resumed; "
                                "choose another --out") from e
        if not cfg.resume:
            raise PipelineError(f"run folder {run_dir} already holds a run: pass --resume to "
                                "continue it, or choose another --out")
        mine = cfg.identity()
        changed = sorted(k for k in mine if k not in ("out", "cache") and old.get(k) != mine[k])
        if not _same_cache(old, cfg.cache, manifest):
            changed.append("cache")
        if changed:
            raise PipelineError(f"cannot resume {run_dir}: settings differ from the saved run in "
                                f"{', '.join(changed)}; use the original settings or another --out")
        checkpoints = ckpt.list_checkpoints(run_dir)
        return checkpoints[-1] if checkpoints else None
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise PipelineError(f"--out {run_dir} exists and is not a run folder of ours; "
                            "choose another --out")
    check_writable(run_dir, flag="--out")
    return None


def create_run_dir(cfg: TrainConfig, manifest) -> None:
    """Write train_config.json (unless the run is resumed): the settings, the cache as an
    absolute path, and the cache's id and model fingerprint for eval and features to check."""
    run_dir = Path(cfg.out)
    saved = run_dir / CONFIG_FILE
    if saved.is_file():
        return
    record = {**cfg.identity(), "cache": absolute_cache(cfg.cache),
              "cache_id": manifest.cache_id, "model_fingerprint": manifest.model_fingerprint}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(record, indent=1))
    except OSError as e:
        raise PipelineError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from e


def absolute_cache(cache: str) -> str:
    """A local cache as an absolute path (a URL as is), so the run names it from anywhere."""
    return cache if is_remote(cache) else str(Path(cache).resolve())


def _same_cache(old: dict, cache: str, manifest) -> bool:
    """Same path once resolved (a changed cache there is caught by the checkpoint's cache id),
    or the same cache id at another path (a moved cache)."""
    same_path = absolute_cache(str(old.get("cache"))) == absolute_cache(cache)
    return same_path or old.get("cache_id") == manifest.cache_id
