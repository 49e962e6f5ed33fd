"""Writing a cache: its arrays, one chunk at a time (data files, then the record that makes the
chunk count), and finalize, which marks the cache complete once every chunk has its record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from cache_schema.manifest import STATUS_COMPLETE, Manifest
from cache_schema.store import (
    aggregate_norm_stats,
    array_specs,
    chunk_checksums,
    list_done_chunks,
    read_chunk_record,
    read_manifest,
    records_digest,
    write_chunk_record,
    write_manifest,
)


def _compressors(codec: str, dtype: np.dtype):
    if codec == "zstd":
        return [ZstdCodec(level=3)]
    if codec == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=dtype.itemsize)]
    return None


def open_arrays(root: str | Path, m: Manifest) -> dict[str, zarr.Array]:
    """Open every array of the cache, creating the ones whose metadata is not written yet."""
    group = zarr.open_group(str(root), mode="r+")
    arrays = {}
    for name, (shape, dtype) in array_specs(m).items():
        if Path(root, name, "zarr.json").is_file():
            arrays[name] = group[name]
            continue
        is_act = len(shape) == 2
        arrays[name] = group.create_array(
            name, shape=shape, dtype=dtype, chunks=(m.rows_per_chunk, *shape[1:]),
            compressors=_compressors(m.codec, dtype) if is_act else None,
            fill_value=0, config={"write_empty_chunks": True},
        )
    return arrays


def write_chunk(root: Path, m: Manifest, arrays: dict[str, zarr.Array], k: int,
                data: dict[str, np.ndarray], stats: dict) -> None:
    """Write chunk k's values into every array, then its record (checksums of the fsynced files
    and stats), so a record always means the chunk's data is complete."""
    lo = k * m.rows_per_chunk
    for name, values in data.items():
        arrays[name][lo: lo + len(values)] = values
    record = {"chunk": k, **chunk_checksums(root, m, k, sync=True), "stats": stats}
    write_chunk_record(root, k, record)


def finalize(out: Path, m: Manifest) -> Manifest:
    """Mark the cache complete once every chunk has a record: aggregate stats, pin the records."""
    done = list_done_chunks(out)
    current = read_manifest(out)
    if current.status == STATUS_COMPLETE:
        return current
    if len(done) < m.n_chunks:
        return current
    records = [read_chunk_record(out, k) for k in range(m.n_chunks)]
    m.norm_stats = aggregate_norm_stats(records)
    m.chunks_digest = records_digest(out, m)
    m.status = STATUS_COMPLETE
    write_manifest(out, m)
    return m
