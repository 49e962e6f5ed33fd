"""The on-disk contract of an activation cache. Depends on nothing in `pipeline`."""

from cache_schema.check import verify
from cache_schema.dtypes import storage_dtype
from cache_schema.errors import CacheError
from cache_schema.integrity import ChunkMismatch, read_chunk_file
from cache_schema.manifest import (
    CODECS,
    MASK_STRATEGIES,
    SCHEMA_VERSION,
    STATUS_COMPLETE,
    STATUS_WRITING,
    STORAGE_DTYPES,
    STREAMS,
    Manifest,
    hook_name,
)
from cache_schema.store import (
    IS_MASKED,
    MASKED_TOKENS,
    SEQ,
    TOKENS,
    activation_array,
    aggregate_norm_stats,
    array_specs,
    chunk_checksums,
    chunk_file,
    chunk_stats,
    data_bytes,
    list_done_chunks,
    open_cache,
    read_chunk_record,
    read_manifest,
    records_digest,
    remove_leftovers,
    write_chunk_record,
    write_manifest,
)

__all__ = [
    "CODECS", "IS_MASKED", "MASKED_TOKENS", "MASK_STRATEGIES", "SCHEMA_VERSION", "SEQ",
    "STATUS_COMPLETE", "STATUS_WRITING", "STORAGE_DTYPES", "STREAMS", "TOKENS", "CacheError",
    "ChunkMismatch", "Manifest", "activation_array", "aggregate_norm_stats", "array_specs",
    "chunk_checksums", "chunk_file", "chunk_stats", "data_bytes", "hook_name", "list_done_chunks",
    "open_cache", "read_chunk_file", "read_chunk_record", "read_manifest", "records_digest",
    "remove_leftovers", "storage_dtype", "verify", "write_chunk_record", "write_manifest",
]
