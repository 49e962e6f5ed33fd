"""Checkpoints: the full training state in safetensors + JSON (no pickle), written atomically, with
the SHA-256 of every file appended to the run's audit log."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cache_schema.store import file_sha256 as sha256_file
from pipeline.errors import PipelineError

CHECKPOINTS = "checkpoints"
AUDIT_LOG = "audit.log"
STATE_FILE, META_FILE = "state.safetensors", "state.json"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def audit(run_dir: Path, step: int, files: list[Path]) -> None:
    """Append one line per file (step, path relative to the run, SHA-256) to audit.log."""
    with open(run_dir / AUDIT_LOG, "a") as log:
        for path in files:
            line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step,
                    "file": str(path.relative_to(run_dir)), "sha256": sha256_file(path)}
            log.write(json.dumps(line) + "\n")
        log.flush()
        os.fsync(log.fileno())


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                    keep: int = 2) -> Path:
    """Write checkpoints/step_{step:08d}/ atomically (a temporary folder renamed into place), log
    its files' hashes, and keep only the newest `keep` checkpoints."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(cpu, str(tmp / STATE_FILE))
    (tmp / META_FILE).write_text(json.dumps({**meta, "step": step}, indent=1))
    for name in (STATE_FILE, META_FILE):
        _fsync(tmp / name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    audit(run_dir, step, [final / STATE_FILE, final / META_FILE])
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder exists only once fully written)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / META_FILE).is_file())


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of one checkpoint; a clear error if a file is unreadable."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        tensors = load_file(str(path / STATE_FILE))
    except Exception as e:  # safetensors raises its own error type
        raise PipelineError(f"checkpoint {path} cannot be read ({e}); delete it to resume from "
                            "the one before, or start a new run") from e
    return tensors, meta
