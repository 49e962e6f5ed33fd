"""Check one chunk file against its chunk record: its size (exact for uncompressed arrays) and its
digests (SHA-256 and/or XXH3-64), computed over the bytes while they are read. `verify` and the
training loader both read chunk files through `read_chunk_file`, so what counts as a good chunk
file has one owner.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cache_schema.errors import CacheError
from cache_schema.files import HASHES
from cache_schema.manifest import Manifest
from cache_schema.store import RECORD_KEYS

BLOCK = 1 << 20
"""Bytes read and hashed at a time: the block is still in the core's cache when it is hashed."""


NAMES = {"sha256": "SHA-256", "xxh3": "XXH3-64"}


class ChunkMismatch(CacheError):
    """A chunk file is missing, has the wrong size, or does not match a recorded digest.
    `problem` is the one-line form `verify` lists; str() is the full paragraph."""

    def __init__(self, k: int, array: str, path: Path, detail: str):
        self.problem = f"chunk {k}: {array} {detail} ({path})"
        super().__init__(
            f"chunk {k} of {array} ({path}) {detail}. The file is truncated or corrupt; run "
            "`pipeline verify` on the cache to list every damaged chunk, then re-extract the "
            "cache or restore the file. Nothing from this chunk was used.")


def checksum_mismatch(algorithm: str, found: str, recorded: str) -> str:
    """The detail of a ChunkMismatch for a file whose bytes do not hash to its record."""
    return (f"checksum mismatch (its {NAMES[algorithm]} is {found[:16]}..., its chunk record has "
            f"{recorded[:16]}...)")


def recorded_digests(record: object, array: str, algorithms: tuple[str, ...]) -> dict[str, str]:
    """{algorithm: recorded hex digest} of `array`'s file in a chunk record, for those of
    `algorithms` the record holds (caches written before XXH3-64 was recorded hold SHA-256 only)."""
    out = {}
    for a in algorithms:
        table = record.get(RECORD_KEYS[a]) if isinstance(record, dict) else None
        if isinstance(table, dict) and isinstance(table.get(array), str):
            out[a] = table[array]
    return out


def expected_file_bytes(m: Manifest, shape: tuple[int, ...], dtype: np.dtype) -> int | None:
    """Exact byte size of a chunk file of an array of this shape and dtype, or None where the
    manifest's codec compresses it (activations; token arrays are never compressed)."""
    if len(shape) == 2 and m.codec != "none":
        return None
    return m.rows_per_chunk * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize


def read_chunk_file(path: Path, k: int, array: str, *, size: int | None = None,
                    digests: dict[str, str] | None = None, out: memoryview | None = None
                    ) -> memoryview:
    """The bytes of chunk k's file of `array`, read into `out` (which must then be exactly
    `size` bytes long) or into a new buffer. With `size`, the file must be that long; with
    `digests` ({algorithm: hex}, algorithms of files.HASHES), its bytes must hash to each (hashed
    block by block as they are read, so the file is read once). ChunkMismatch otherwise; a file
    that shrinks while it is read is caught too."""
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by the with below)
    except FileNotFoundError:
        raise ChunkMismatch(k, array, path, "is missing") from None
    with f:
        found = os.fstat(f.fileno()).st_size
        if size is not None and found != size:
            raise ChunkMismatch(k, array, path, f"has {found} bytes where {size} were expected")
        if out is None:
            out = memoryview(bytearray(found))
        elif len(out) != found:
            raise ChunkMismatch(k, array, path, f"has {found} bytes where {len(out)} were expected")
        if hasattr(os, "posix_fadvise") and found:  # cold file: the kernel reads ahead while
            os.posix_fadvise(f.fileno(), 0, found, os.POSIX_FADV_WILLNEED)  # we hash
        hs = {a: HASHES[a]() for a in (digests or {})}
        got = 0
        while got < found:
            n = f.readinto(out[got:got + BLOCK])
            if not n:
                raise ChunkMismatch(k, array, path, f"ended after {got} of its {found} bytes "
                                                    "(shortened while it was read)")
            for h in hs.values():
                h.update(out[got:got + n])  # both hashers release the GIL on large buffers
            got += n
    for a, h in hs.items():
        if h.hexdigest() != digests[a]:
            raise ChunkMismatch(k, array, path, checksum_mismatch(a, h.hexdigest(), digests[a]))
    return out


def decompress(codec: str, frame: memoryview, k: int, array: str, path: Path, nbytes: int
               ) -> memoryview:
    """The raw bytes of a compressed chunk file (SPEC.md §2: a zstd or Blosc1 frame), which must
    be `nbytes` long; ChunkMismatch if the frame cannot be decoded or decodes to another size."""
    import numcodecs  # only compressed caches need it

    try:
        raw = {"zstd": numcodecs.Zstd, "blosc-lz4": numcodecs.Blosc}[codec]().decode(frame)
    except Exception as e:  # the codecs' own error types
        raise ChunkMismatch(k, array, path, f"cannot be decoded ({e})") from e
    raw = memoryview(raw).cast("B")
    if len(raw) != nbytes:
        raise ChunkMismatch(k, array, path, f"decodes to {len(raw)} bytes where {nbytes} were "
                                            "expected")
    return raw
