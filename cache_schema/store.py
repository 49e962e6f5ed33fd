"""On-disk layout of a cache: array names, chunk files, chunk records, manifest I/O, norm sums.

Every stage reads and writes caches through these functions; SPEC.md describes the same layout
for readers that do not use this package.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from cache_schema.dtypes import storage_dtype
from cache_schema.errors import CacheError
from cache_schema.files import atomic_write, file_digests
from cache_schema.manifest import STATUS_COMPLETE, STREAMS, Manifest

MANIFEST_KEY = "manifest"
RECORDS_DIR = "_chunks"
RECORD_KEYS = {"sha256": "checksums", "xxh3": "xxh3"}
"""Where a chunk record keeps each algorithm's digests of its files (SPEC.md §5)."""
TOKENS, MASKED_TOKENS, IS_MASKED, SEQ = "tokens", "masked_tokens", "is_masked", "seq"
TOKEN_ARRAYS = {TOKENS: "<i4", MASKED_TOKENS: "<i4", IS_MASKED: "|b1", SEQ: "<i4"}


def activation_array(stream: str, hook: str) -> str:
    """Array path of one stream ('clean' or 'masked') of one hook."""
    if stream not in STREAMS:
        raise CacheError(f"unknown stream {stream!r}: expected one of {STREAMS}")
    return f"{stream}/{hook}"


def array_specs(m: Manifest) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every array of the cache: path -> (shape, on-disk dtype)."""
    specs = {name: ((m.n_tokens,), np.dtype(dt)) for name, dt in TOKEN_ARRAYS.items()}
    for hook in m.hooks:
        for stream in STREAMS:
            specs[activation_array(stream, hook)] = ((m.n_tokens, m.d_model),
                                                     storage_dtype(m.storage_dtype))
    return specs


def data_bytes(n_tokens: int, d_model: int, n_hooks: int, storage: str) -> int:
    """Bytes of every array of an uncompressed cache of n_tokens rows (array_specs' arrays; the
    metadata and chunk records add well under 0.1%)."""
    per_row = sum(np.dtype(dt).itemsize for dt in TOKEN_ARRAYS.values())
    per_row += len(STREAMS) * n_hooks * d_model * storage_dtype(storage).itemsize
    return n_tokens * per_row


def chunk_file(root: str | Path, array: str, ndim: int, k: int) -> Path:
    """File of chunk k of an array (Zarr v3 default chunk key encoding, '/' separator)."""
    return Path(root, array, "c", str(k), *(["0"] * (ndim - 1)))


# Interrupted writes: ours (files.atomic_write) and zarr's local store (`<chunk>.<uuid>.partial`).
LEFTOVER_SUFFIXES = (".tmp", ".partial")


def remove_leftovers(root: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer leaves behind; returns what was removed.
    Only call this while no writer is running on the cache (before a resume starts)."""
    gone = [p for p in Path(root).rglob("*") if p.is_file() and p.name.endswith(LEFTOVER_SUFFIXES)]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_manifest(root: str | Path, m: Manifest) -> None:
    """Write the root group's zarr.json with the manifest as its `manifest` attribute."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    group = {"zarr_format": 3, "node_type": "group", "attributes": {MANIFEST_KEY: m.to_dict()}}
    atomic_write(root / "zarr.json", _dumps(group))


def read_manifest(root: str | Path) -> Manifest:
    """Manifest of the cache at root; CacheError if there is none or it is invalid."""
    path = Path(root, "zarr.json")
    if not Path(root).exists():
        raise CacheError(f"no cache at {root}: the path does not exist")
    if not path.is_file():
        raise CacheError(f"{root} is not a cache: it has no zarr.json")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"{path} is unreadable or not JSON ({e}); the cache is corrupt") from e
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    if MANIFEST_KEY not in attrs:
        raise CacheError(f"{root} is a Zarr group but not a pipeline cache: no manifest attribute")
    return Manifest.from_dict(attrs[MANIFEST_KEY])


def open_cache(root: str | Path, require_complete: bool = True) -> Manifest:
    """Validated manifest of a cache that readers may use."""
    m = read_manifest(root)
    if require_complete and m.status != STATUS_COMPLETE:
        done = len(list_done_chunks(root))
        raise CacheError(
            f"cache {root} is not complete (status '{m.status}', {done}/{m.n_chunks} chunks "
            "written): finish it by re-running the same `pipeline extract` command"
        )
    return m


def record_path(root: str | Path, k: int) -> Path:
    return Path(root, RECORDS_DIR, f"{k:08d}.json")


def write_chunk_record(root: str | Path, k: int, record: dict[str, Any]) -> None:
    """Mark chunk k done: its checksums and norm statistics. Written after the chunk's data."""
    path = record_path(root, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, _dumps(record))


def read_chunk_record(root: str | Path, k: int) -> dict[str, Any]:
    path = record_path(root, k)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"chunk {k} has no record ({path}): the chunk was never finished") from None
    except ValueError as e:
        raise CacheError(f"chunk {k}: record {path} is not valid JSON ({e})") from e


def list_done_chunks(root: str | Path) -> list[int]:
    """Chunks whose record exists (their data was fully written before the record)."""
    d = Path(root, RECORDS_DIR)
    if not d.is_dir():
        return []
    return sorted(int(p.stem) for p in d.glob("*.json") if p.stem.isdigit())


def chunk_checksums(root: str | Path, m: Manifest, k: int, sync: bool = False
                    ) -> dict[str, dict[str, str]]:
    """The digests of chunk k's file in every array, as its record holds them (SPEC.md §5):
    {"checksums": {array: SHA-256}, "xxh3": {array: XXH3-64}}, each file read once (sync: fsync
    each file, before its record)."""
    out: dict[str, dict[str, str]] = {RECORD_KEYS[a]: {} for a in RECORD_KEYS}
    for name, (shape, _) in array_specs(m).items():
        digests = file_digests(chunk_file(root, name, len(shape), k), tuple(RECORD_KEYS), sync)
        for a, hexdigest in digests.items():
            out[RECORD_KEYS[a]][name] = hexdigest
    return out


def records_digest(root: str | Path, m: Manifest) -> str:
    """SHA-256 over every chunk record in chunk order (pins the records once complete)."""
    h = hashlib.sha256()
    for k in range(m.n_chunks):
        h.update(_dumps(read_chunk_record(root, k)))
    return h.hexdigest()


def chunk_stats(norms: dict[str, dict[str, np.ndarray]], special: np.ndarray) -> dict:
    """Norm sums of one chunk per hook and stream, with special-token rows counted apart
    (the `stats` of a chunk record, SPEC.md §5-6)."""
    out: dict = {}
    for hook, streams in norms.items():
        for stream in STREAMS:
            n = streams[stream].astype(np.float64)
            reg, spc = n[~special], n[special]
            out.setdefault(hook, {})[stream] = {
                "count": int(reg.size), "sum": float(reg.sum()),
                "sumsq": float(np.square(reg).sum()), "max": float(reg.max(initial=0.0)),
                "special_count": int(spc.size), "special_sum": float(spc.sum()),
                "special_max": float(spc.max(initial=0.0)),
            }
    return out


def aggregate_norm_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum per-chunk norm sums into per-hook, per-stream statistics (see SPEC.md)."""
    out: dict[str, Any] = {}
    for rec in records:
        for hook, streams in rec["stats"].items():
            for stream, s in streams.items():
                acc = out.setdefault(hook, {}).setdefault(stream, dict.fromkeys(s, 0.0))
                for key, v in s.items():
                    acc[key] = max(acc[key], v) if key.endswith("max") else acc[key] + v
    for streams in out.values():
        for stream, a in streams.items():
            n, ns = a["count"], a["special_count"]
            mean = a["sum"] / n if n else None
            streams[stream] = {
                "count": int(n),
                "mean_norm": mean,
                "rms_norm": math.sqrt(a["sumsq"] / n) if n else None,
                "std_norm": math.sqrt(max(a["sumsq"] / n - mean * mean, 0.0)) if n else None,
                "max_norm": a["max"] if n else None,
                "special_count": int(ns),
                "special_mean_norm": a["special_sum"] / ns if ns else None,
                "special_max_norm": a["special_max"] if ns else None,
            }
    return out
