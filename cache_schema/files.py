"""File hashing and atomic writes: the one implementation the cache and everything above it use."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def file_sha256(path: Path, sync: bool = False) -> str:
    """SHA-256 of a file; with sync, also flush it to stable storage (fsync)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def atomic_write(path: Path, data: bytes | Callable[[Path], object]) -> None:
    """Write `data` (bytes, or a function that writes a given path) to a temporary file, fsync it
    and rename it over `path`: a crash leaves the old content or the new one, never a mix. The
    temporary name ends in `.tmp` (SPEC.md §1) and is unique per process."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    if callable(data):
        data(tmp)
    else:
        tmp.write_bytes(data)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
