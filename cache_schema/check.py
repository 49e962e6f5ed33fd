"""`verify`: check a whole cache against its manifest (SPEC.md §7): each array's zarr.json, each
chunk file's size and SHA-256 (through integrity.read_chunk_file, as the loader does), the norm
statistics recomputed from the data against the chunk records, and the manifest's aggregate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from cache_schema.dtypes import decode
from cache_schema.errors import CacheError
from cache_schema.files import HASHES
from cache_schema.integrity import (
    ChunkMismatch,
    decompress,
    expected_file_bytes,
    read_chunk_file,
    recorded_digests,
)
from cache_schema.manifest import STATUS_COMPLETE, Manifest
from cache_schema.store import (
    TOKENS,
    aggregate_norm_stats,
    array_specs,
    chunk_file,
    chunk_stats,
    list_done_chunks,
    read_chunk_record,
    read_manifest,
    records_digest,
)

_ZARR_TYPES = {"<i4": "int32", "|b1": "bool", "<f4": "float32", "<f2": "float16", "<u2": "uint16"}
_RTOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}
"""Recomputed norm sums against recorded ones: the writer takes norms before the cast to the
storage dtype (SPEC.md §6), so they agree only to that dtype's precision."""
_AGGREGATE_RTOL = 1e-9  # the manifest sums the same float64 numbers, maybe in another order


def expected_array_meta(m: Manifest, shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    """The fields of an array's zarr.json that SPEC.md §2 fixes, as the manifest implies them."""
    codecs = ["bytes"]
    if len(shape) == 2 and m.codec != "none":
        codecs.append({"zstd": "zstd", "blosc-lz4": "blosc"}[m.codec])
    return {"zarr_format": 3, "node_type": "array", "shape": list(shape),
            "data_type": _ZARR_TYPES[dtype.str],
            "chunk_shape": [m.rows_per_chunk, *shape[1:]], "chunk_key_encoding": "default /",
            "codecs": codecs, "storage_transformers": []}


def _found_array_meta(meta: dict[str, Any]) -> dict[str, Any]:
    grid = meta.get("chunk_grid") or {}
    key = meta.get("chunk_key_encoding") or {}
    return {"zarr_format": meta.get("zarr_format"), "node_type": meta.get("node_type"),
            "shape": meta.get("shape"), "data_type": meta.get("data_type"),
            "chunk_shape": (grid.get("configuration") or {}).get("chunk_shape")
            if grid.get("name") == "regular" else f"a {grid.get('name')!r} grid",
            "chunk_key_encoding": f"{key.get('name')} "
                                  f"{(key.get('configuration') or {}).get('separator', '/')}",
            "codecs": [c.get("name") if isinstance(c, dict) else c
                       for c in meta.get("codecs") or []],
            "storage_transformers": meta.get("storage_transformers", [])}


def check_array_metadata(root: str | Path, m: Manifest) -> list[str]:
    """Each array's zarr.json against what the manifest implies; one problem per field."""
    problems = []
    for name, (shape, dtype) in array_specs(m).items():
        path = Path(root, name, "zarr.json")
        try:
            meta = json.loads(path.read_text())
            found = _found_array_meta(meta if isinstance(meta, dict) else {})
        except (OSError, ValueError, AttributeError, TypeError) as e:
            problems.append(f"{name}: array metadata {path} unreadable ({e})")
            continue
        for field, want in expected_array_meta(m, shape, dtype).items():
            if found[field] != want:
                problems.append(f"{name}: {path} has {field} {found[field]} where the manifest "
                                f"implies {want}")
    return problems


def _decode(m: Manifest, data: memoryview, shape: tuple[int, ...], dtype: np.dtype,
            k: int, name: str, path: Path) -> np.ndarray:
    """A chunk's values as float32 [R, D] (activations) or its on-disk dtype (tokens)."""
    if expected_file_bytes(m, shape, dtype) is None:
        data = decompress(m.codec, data, k, name, path,
                          m.rows_per_chunk * shape[1] * dtype.itemsize)
    values = np.frombuffer(data, dtype=dtype).reshape(m.rows_per_chunk, *shape[1:])
    if len(shape) == 1:
        return values
    return decode(values, m.storage_dtype)


def _close(a: Any, b: Any, rtol: float) -> bool:
    if a is None or b is None or (isinstance(a, int) and isinstance(b, int)):
        return a == b
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return False
    return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=1e-6)


def _compare(recorded: dict, recomputed: dict, rtol: float, where: str) -> list[str]:
    problems = []
    for hook, streams in recomputed.items():
        for stream, want in streams.items():
            got = recorded.get(hook) if isinstance(recorded, dict) else None
            got = got.get(stream) if isinstance(got, dict) else None
            if not isinstance(got, dict):
                problems.append(f"{where} have no entry for {hook} {stream}")
                continue
            for key, value in want.items():
                if not _close(got.get(key), value, rtol):
                    problems.append(f"{where} {hook} {stream} {key} is {got.get(key)} where the "
                                    f"{'data' if where.startswith('chunk') else 'records'} "
                                    f"give {value}")
    return problems


def _check_chunk(root: str | Path, m: Manifest, k: int, record: dict) -> list[str]:
    """Size, SHA-256 (and XXH3-64 where recorded) and norm statistics of every file of chunk k,
    each file read once."""
    problems, norms, special = [], {}, None
    for name, (shape, dtype) in array_specs(m).items():  # tokens first: they mark special rows
        path = chunk_file(root, name, len(shape), k)
        digests = recorded_digests(record, name, tuple(HASHES))
        if "sha256" not in digests:
            problems.append(f"chunk {k}: its record has no checksum for {name}")
            continue
        try:
            data = read_chunk_file(path, k, name, size=expected_file_bytes(m, shape, dtype),
                                   digests=digests)
            values = _decode(m, data, shape, dtype, k, name, path)
        except ChunkMismatch as e:
            problems.append(e.problem)
            continue
        if name == TOKENS:
            special = np.isin(values, m.special_token_ids)
        elif len(shape) == 2:
            stream, hook = name.split("/", 1)
            norms.setdefault(hook, {})[stream] = np.linalg.norm(values, axis=1)
    if problems or special is None:
        return problems  # statistics of data already known bad would only repeat that
    recomputed = chunk_stats(norms, special)
    return _compare(record.get("stats") or {}, recomputed, _RTOL[m.storage_dtype],
                    f"chunk {k}: recorded norm stats")


def verify(root: str | Path) -> tuple[Manifest, list[str]]:
    """Check the arrays' metadata, every chunk file (size, SHA-256) and the norm statistics
    against the manifest and the chunk records. Returns the problems found, each naming the
    chunk or the array."""
    m = read_manifest(root)
    problems = check_array_metadata(root, m)
    done = set(list_done_chunks(root))
    records = []
    for k in range(m.n_chunks):
        if k not in done:
            problems.append(f"chunk {k}: not written (no record)")
            continue
        try:
            record = read_chunk_record(root, k)
            if not isinstance(record, dict):
                raise CacheError("not a JSON object")
        except CacheError as e:
            problems.append(f"chunk {k}: bad record ({e})")
            continue
        records.append(record)
        problems += _check_chunk(root, m, k, record)
    if m.status != STATUS_COMPLETE or len(records) != m.n_chunks:
        return m, problems
    if records_digest(root, m) != m.chunks_digest:
        problems.append("chunk records do not match the manifest's chunks_digest")
    try:
        aggregate = aggregate_norm_stats(records)
    except (KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
        problems.append(f"chunk records hold malformed norm stats ({e!r})")
    else:
        problems += _compare(m.norm_stats, aggregate, _AGGREGATE_RTOL, "manifest norm_stats")
    return m, problems
