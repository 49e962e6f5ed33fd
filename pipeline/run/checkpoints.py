"""Checkpoints: tensors in safetensors and metadata in JSON (no pickle), written atomically, their
SHA-256 logged in audit.log before they appear; loaded only if they still hash to that entry."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file

from pipeline.errors import PipelineError
from pipeline.run import audit_log
from pipeline.run.layout import AUDIT_LOG, CHECKPOINTS, META_FILE, STATE_FILE, STEP_PREFIX, checkpoint_name


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict,
         keep: int = 2) -> Path:
    """Write checkpoints/step_{step:08d}/ (a temporary folder renamed into place), log its files'
    hashes, and keep only the newest `keep` checkpoints."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(cpu, str(tmp / STATE_FILE))
    (tmp / META_FILE).write_text(json.dumps({**meta, "step": step}, indent=1))
    for name in (STATE_FILE, META_FILE):
        _fsync(tmp / name)
    # logged before the rename: a checkpoint that exists always has its audit entry
    audit_log.append(run_dir, step, [tmp / STATE_FILE, tmp / META_FILE],
                     [final / STATE_FILE, final / META_FILE])
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in listed(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def listed(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder exists only once fully written)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{STEP_PREFIX}*") if (p / META_FILE).is_file())


def _read_audited(run_dir: Path, path: Path, audited: dict[str, str]) -> bytes:
    """The bytes of one checkpoint file, if they hash to its last audit.log entry."""
    folder = path.parent
    way_out = (f"restore it, or delete {folder} to resume from the checkpoint before it, or "
               "start a new run with another --out")
    name = str(path.relative_to(run_dir))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PipelineError(f"checkpoint file {path} cannot be read ({e}): {way_out}") from e
    found = hashlib.sha256(data).hexdigest()
    if name not in audited:
        raise PipelineError(f"checkpoint file {path} has no entry in {run_dir / AUDIT_LOG}, so "
                            f"it cannot be checked and is not resumed from: {way_out}")
    if audited[name] != found:
        raise PipelineError(f"checkpoint file {path} was changed after it was written: its "
                            f"SHA-256 is {found}, but {run_dir / AUDIT_LOG} recorded "
                            f"{audited[name]}; it is not resumed from: {way_out}")
    return data


def load_verified(run_dir: Path, path: Path, expected: frozenset[str] | set[str] = frozenset()
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of one checkpoint, checked against the audit log (the bytes hashed
    are the bytes loaded) and for the `expected` tensor entries; a clear error otherwise."""
    audited, _ = audit_log.last_sha256(run_dir)
    state = _read_audited(run_dir, path / STATE_FILE, audited)
    meta_bytes = _read_audited(run_dir, path / META_FILE, audited)
    try:
        meta = json.loads(meta_bytes)
        tensors = load(state)
    except (ValueError, SafetensorError) as e:
        raise PipelineError(f"checkpoint {path} cannot be read ({e}); delete it to resume from "
                            "the one before, or start a new run") from e
    missing = sorted(expected - tensors.keys())
    if missing:
        raise PipelineError(f"checkpoint {path} lacks the entries {', '.join(missing)} of "
                            f"{STATE_FILE}, which a resume needs: delete {path} to resume from "
                            "the checkpoint before it, or start a new run with another --out")
    return tensors, meta


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint, unchecked (the audit checks the hashes on its own)."""
    try:
        return load_file(str(path / STATE_FILE))
    except Exception as e:  # safetensors raises its own error type
        raise PipelineError(f"checkpoint file {path / STATE_FILE} cannot be read ({e})") from e
