"""Checkpoints: the full training state in safetensors + JSON (no pickle), written atomically, with
the SHA-256 of every file appended to the run's audit log; a resume loads a checkpoint only if its
files still hash to the audit log's last entry for them and it holds every entry it needs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from cache_schema.files import file_sha256
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


def audit(run_dir: Path, step: int, files: list[Path], names: list[Path] | None = None) -> None:
    """Append one line per file (step, path relative to the run, SHA-256) to audit.log; `names`:
    the paths to log for those files (where they are about to be renamed to)."""
    with open(run_dir / AUDIT_LOG, "a") as log:
        for path, name in zip(files, names or files, strict=True):
            line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step,
                    "file": str(name.relative_to(run_dir)), "sha256": file_sha256(path)}
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
    # logged before the rename: a checkpoint that exists always has its audit entry
    audit(run_dir, step, [tmp / STATE_FILE, tmp / META_FILE],
          [final / STATE_FILE, final / META_FILE])
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder exists only once fully written)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / META_FILE).is_file())


def audited_sha256(run_dir: Path) -> dict[str, str]:
    """The last SHA-256 audit.log holds for each file (path relative to the run)."""
    out: dict[str, str] = {}
    try:
        lines = (run_dir / AUDIT_LOG).read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            entry = json.loads(line)
            out[str(entry["file"])] = str(entry["sha256"])
        except (ValueError, KeyError, TypeError):
            continue  # a damaged line vouches for nothing
    return out


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


def load_checkpoint(path: Path, run_dir: Path | None = None,
                    expected: frozenset[str] | set[str] = frozenset()
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of one checkpoint of the run in run_dir (default: the run the
    checkpoint is in), checked against the audit log (the bytes hashed are the bytes loaded)
    and for the `expected` tensor entries; a clear error otherwise."""
    run_dir = path.parent.parent if run_dir is None else run_dir
    audited = audited_sha256(run_dir)
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


def expected_entries(sae: torch.nn.Module, step) -> set[str]:
    """The tensor entries a checkpoint of this SAE and TrainStep must hold (Adam's moments
    appear only once a step has run, so they are not required)."""
    return ({f"sae.{k}" for k in sae.state_dict()} | {"rng.cpu"}
            | {f"train.{k}" for k in step.state_tensors() if not k.startswith("adam.")})
