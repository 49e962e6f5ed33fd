"""Checks on output paths made before any work, so an unwritable --out fails in a second rather
than after the whole computation."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import PipelineError


def check_writable(folder: str | Path, files: tuple[str, ...] = (), flag: str = "--out") -> None:
    """Raise unless `folder` (created later if missing) and `files` inside it can be written.
    Uses access(2) only: nothing is created, so a refused command leaves no trace."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"{flag} {folder} is a file, not a folder: choose another {flag}")
    probe = folder
    while not probe.exists():  # the nearest existing ancestor is where mkdir will write
        probe = probe.parent
    if not probe.is_dir():
        raise PipelineError(f"cannot write {flag} {folder}: {probe} is a file, not a folder; "
                            f"choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PipelineError(f"cannot write {flag} {folder}: {probe} is not writable; choose "
                            f"another {flag} or fix its permissions")
    for name in files:
        path = folder / name
        if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
            raise PipelineError(f"cannot write {path}: it is a folder or not writable; move it "
                                "away or fix its permissions")
