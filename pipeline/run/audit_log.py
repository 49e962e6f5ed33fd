"""audit.log: one JSON line per written file (time, step, path relative to the run, SHA-256),
appended and fsynced, never rewritten; a file's last line is what it must still hash to."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cache_schema.files import file_sha256
from pipeline.errors import PipelineError
from pipeline.run.layout import AUDIT_LOG, CHECKPOINTS, WEIGHTS_FILE


def append(run_dir: Path, step: int, files: list[Path], names: list[Path] | None = None) -> None:
    """Log the SHA-256 of each file; `names`: the paths to log for those files (where they are
    about to be renamed to)."""
    with open(run_dir / AUDIT_LOG, "a") as log:
        for path, name in zip(files, names or files, strict=True):
            line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step,
                    "file": str(name.relative_to(run_dir)), "sha256": file_sha256(path)}
            log.write(json.dumps(line) + "\n")
        log.flush()
        os.fsync(log.fileno())


def last_sha256(run_dir: Path) -> tuple[dict[str, str], list[int]]:
    """({file: the last SHA-256 logged for it}, numbers of the damaged lines, which vouch for
    nothing); ({}, []) without an audit log."""
    out: dict[str, str] = {}
    damaged: list[int] = []
    try:
        lines = (run_dir / AUDIT_LOG).read_text().splitlines()
    except FileNotFoundError:
        return out, damaged
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            out[str(entry["file"])] = str(entry["sha256"])
        except (ValueError, KeyError, TypeError):
            damaged.append(number)
    return out, damaged


def unmatched_files(run_dir: Path) -> list[str]:
    """What no longer matches the log: files whose bytes hash otherwise than their last entry,
    logged files that are gone (checkpoints excepted: old ones are deleted on purpose), and
    damaged lines."""
    if not (run_dir / AUDIT_LOG).is_file():
        raise PipelineError(f"{run_dir} has no {AUDIT_LOG}: not a run folder of `pipeline train`")
    last, damaged = last_sha256(run_dir)
    if WEIGHTS_FILE not in last:
        raise PipelineError(f"{run_dir}/{WEIGHTS_FILE} is not in the audit log: the run did not "
                            "finish")
    bad = [f"{AUDIT_LOG} line {n}: not a JSON entry with file and sha256" for n in damaged]
    for name, digest in sorted(last.items()):
        file = run_dir / name
        actual = file_sha256(file) if file.is_file() else None
        if actual is not None and actual != digest:
            bad.append(f"{name}: SHA-256 {actual[:16]}... does not match the audit "
                       f"log's {digest[:16]}...")
        elif actual is None and not name.startswith(f"{CHECKPOINTS}/"):
            bad.append(f"{name}: missing (logged in {AUDIT_LOG})")
    return bad
