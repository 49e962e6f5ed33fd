"""Check one chunk file against its chunk record: its size (exact for uncompressed arrays) and its
SHA-256, computed over the bytes while they are read. `verify` and the training loader both read
chunk files through `read_chunk_file`, so what counts as a good chunk file has one owner.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from cache_schema.errors import CacheError
from cache_schema.manifest import Manifest

BLOCK = 1 << 20
"""Bytes read and hashed at a time: the block is still in the core's cache when it is hashed."""


class ChunkMismatch(CacheError):
    """A chunk file is missing, has the wrong size, or does not match its recorded SHA-256.
    `problem` is the one-line form `verify` lists; str() is the full paragraph."""

    def __init__(self, k: int, array: str, path: Path, detail: str):
        self.problem = f"chunk {k}: {array} {detail} ({path})"
        super().__init__(
            f"chunk {k} of {array} ({path}) {detail}. The file is truncated or corrupt; run "
            "`pipeline verify` on the cache to list every damaged chunk, then re-extract the "
            "cache or restore the file. Nothing from this chunk was used.")


def checksum_mismatch(found: str, recorded: str) -> str:
    """The detail of a ChunkMismatch for a file whose bytes do not hash to its record."""
    return f"checksum mismatch (its SHA-256 is {found[:16]}..., its chunk record has {recorded[:16]}...)"


def expected_file_bytes(m: Manifest, shape: tuple[int, ...], dtype: np.dtype) -> int | None:
    """Exact byte size of a chunk file of an array of this shape and dtype, or None where the
    manifest's codec compresses it (activations; token arrays are never compressed)."""
    if len(shape) == 2 and m.codec != "none":
        return None
    return m.rows_per_chunk * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize


def read_chunk_file(path: Path, k: int, array: str, *, size: int | None = None,
                    sha256: str | None = None, out: memoryview | None = None) -> memoryview:
    """The bytes of chunk k's file of `array`, read into `out` (which must then be exactly
    `size` bytes long) or into a new buffer. With `size`, the file must be that long; with
    `sha256`, its bytes must hash to it (hashed block by block as they are read, so the file is
    read once). ChunkMismatch otherwise; a file that shrinks while it is read is caught too."""
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
        h = hashlib.sha256() if sha256 is not None else None
        got = 0
        while got < found:
            n = f.readinto(out[got:got + BLOCK])
            if not n:
                raise ChunkMismatch(k, array, path, f"ended after {got} of its {found} bytes "
                                                    "(shortened while it was read)")
            if h is not None:
                h.update(out[got:got + n])  # hashlib releases the GIL on large buffers
            got += n
    if h is not None and h.hexdigest() != sha256:
        raise ChunkMismatch(k, array, path, checksum_mismatch(h.hexdigest(), sha256))
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
