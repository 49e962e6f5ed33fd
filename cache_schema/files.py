"""File hashing and atomic writes: the one implementation the cache and everything above it use."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import xxhash

HASHES = {"sha256": hashlib.sha256, "xxh3": xxhash.xxh3_64}
"""The digests chunk records hold (SPEC.md §5): SHA-256 for provenance and downloads, XXH3-64
(an order of magnitude faster) for the loader's check of every file it reads."""


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder; links count as links, never followed."""
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_symlink() or f.is_file())


def file_sha256(path: Path, sync: bool = False) -> str:
    """SHA-256 of a file; with sync, also flush it to stable storage (fsync)."""
    return file_digests(path, ("sha256",), sync)["sha256"]


def file_digests(path: Path, algorithms: tuple[str, ...], sync: bool = False) -> dict[str, str]:
    """{algorithm: hex digest} of a file read once (algorithms from HASHES); with sync, also
    flush it to stable storage (fsync)."""
    hs = {a: HASHES[a]() for a in algorithms}
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            for h in hs.values():
                h.update(block)
        if sync:
            os.fsync(f.fileno())
    return {a: h.hexdigest() for a, h in hs.items()}


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
