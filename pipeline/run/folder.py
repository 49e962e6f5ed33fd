"""RunDir: a run folder of `pipeline train` (or a bare saved SAE), as SPEC.md describes it. Train
writes through it; eval, audit, features and sweep read through it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cache_schema.manifest import hook_name, layer_of_hook
from pipeline.errors import PipelineError
from pipeline.remote import is_remote
from pipeline.run import audit_log, checkpoints
from pipeline.run.layout import (
    AUDIT_JSON,
    AUDIT_LOG,
    AUDIT_MD,
    CHECKPOINTS,
    CONFIG_FILE,
    EVAL_FILE,
    FEATURES_DIR,
    FREQ_FILE,
    METRICS_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    checkpoint_name,
    checkpoint_step,
)
from pipeline.run.metrics import MetricsLog, read_rows
from pipeline.run.saelens import load_saelens, save_saelens
from pipeline.sae.base import SAE
from pipeline.sae.inference import InferenceSAE


def _file(name: str) -> property:
    return property(lambda self: self.path / name, doc=f"<run>/{name}")


def absolute_cache(cache: str) -> str:
    """A local cache as an absolute path (a URL as is), so the run names it from anywhere."""
    return cache if is_remote(cache) else str(Path(cache).resolve())


class RunDir:
    """Where each file of a run is, and reading and writing them."""

    config = _file(CONFIG_FILE)
    metrics = _file(METRICS_FILE)
    plot = _file(PLOT_FILE)
    summary = _file(SUMMARY_FILE)
    audit_log = _file(AUDIT_LOG)
    checkpoints_dir = _file(CHECKPOINTS)
    eval_json = _file(EVAL_FILE)
    latent_freq = _file(FREQ_FILE)
    audit_json = _file(AUDIT_JSON)
    audit_md = _file(AUDIT_MD)
    features = _file(FEATURES_DIR)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- layer <-> hook name (the cache's names: cache_schema owns them); save_sae goes the
    # other way ---

    @staticmethod
    def layer_of(hook: str | None) -> int:
        """The layer of a saved SAE's hook_name."""
        layer = layer_of_hook(hook or "")
        if layer is None:
            raise PipelineError(f"the SAE's hook {hook!r} is not a {hook_name('L')} hook")
        return layer

    # --- train_config.json ---

    def read_config(self, advice: str = "the run folder is damaged; restore the file from a "
                    "copy of the run") -> dict:
        """The run's settings ({} when the folder is a bare SAE); `advice` ends the error
        raised for a file that is not JSON."""
        if not self.config.is_file():
            return {}
        try:
            return json.loads(self.config.read_text())
        except ValueError as e:
            raise PipelineError(f"{self.config} is not valid JSON ({e}): {advice}") from e

    def write_config(self, settings: dict, cache_id: str, model_fingerprint: str) -> None:
        """The settings, the cache as an absolute path, and the cache's id and model
        fingerprint for eval and features to check."""
        record = {**settings, "cache": absolute_cache(settings["cache"]), "cache_id": cache_id,
                  "model_fingerprint": model_fingerprint}
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.config.write_text(json.dumps(record, indent=1))
        except OSError as e:
            raise PipelineError(f"cannot write the run folder {self.path}: "
                                f"{e.strerror or e}") from e

    def cache(self, given: str | None) -> str:
        """--cache, else the run's cache: absolute in runs written since issue 15, as typed (so
        relative to the working folder) in older ones."""
        cache = given or self.read_config().get("cache")
        if not cache:
            raise PipelineError(f"{self.path} does not say which cache it was trained on: pass "
                                "--cache")
        return str(cache)

    # --- checkpoints and the audit log ---

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return checkpoints.listed(self.path)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / checkpoint_name(step)

    @staticmethod
    def step_of(checkpoint: Path) -> int:
        return checkpoint_step(checkpoint.name)

    def save_checkpoint(self, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                        keep: int = 2) -> Path:
        return checkpoints.save(self.path, step, tensors, meta, keep)

    def load_checkpoint(self, checkpoint: Path, expected: frozenset[str] | set[str] = frozenset()
                        ) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and metadata, checked against the audit log and for `expected` entries."""
        return checkpoints.load_verified(self.path, checkpoint, expected)

    def checkpoint_state(self, checkpoint: Path) -> dict[str, torch.Tensor]:
        """The tensors of a checkpoint, unchecked."""
        return checkpoints.load_state(checkpoint)

    def audit(self, step: int, files: list[Path], names: list[Path] | None = None) -> None:
        """Append the SHA-256 of `files` (logged under `names`, default their own) to audit.log."""
        audit_log.append(self.path, step, files, names)

    def unmatched_files(self) -> list[str]:
        """Logged files that changed or are gone, and damaged log lines (audit.log must exist
        and log the SAE weights)."""
        return audit_log.unmatched_files(self.path)

    # --- metrics.jsonl, summary.json ---

    def metrics_log(self, truncate_at: int | None = None) -> MetricsLog:
        return MetricsLog(self.metrics, truncate_at)

    def read_metrics(self) -> list[dict]:
        return read_rows(self.metrics)

    def write_summary(self, summary: dict) -> None:
        self.summary.write_text(json.dumps(summary, indent=1))

    # --- the SAELens folder ---

    def save_sae(self, sae: SAE, scale: float, layer: int, metadata: dict, step: int
                 ) -> dict[str, str]:
        """Save the SAE (for the hook of `layer`) and log its files at `step`; returns
        {file name: SHA-256}."""
        hashes = save_saelens(self.path, sae, scale, {"hook_name": hook_name(layer), **metadata})
        self.audit(step, [self.path / name for name in hashes])
        return hashes

    def load_sae(self) -> InferenceSAE:
        return load_saelens(self.path)
