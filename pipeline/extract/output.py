"""The output side of `pipeline extract`: the writer lock, creating or checking the cache
folder (local, or the staging mirror of a remote cache), and marking it complete."""

from __future__ import annotations

import shutil
from pathlib import Path

from cache_schema import (
    CacheError,
    Manifest,
    array_specs,
    chunk_file,
    list_done_chunks,
    read_manifest,
    write_manifest,
)
from cache_schema.clear import remove_cache, remove_own_leftovers
from cache_schema.lock import LOCK_NAME, WriterLock
from cache_schema.store import record_path
from cache_schema.write import open_arrays
from pipeline.errors import PipelineError


def _check_folder(out: Path) -> None:
    """Refuse a path that is a file, or a non-empty folder without a cache (read-only)."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        try:
            read_manifest(out)
        except CacheError as e:
            raise PipelineError(f"output {out} is not empty and is not a pipeline cache ({e}); "
                                "choose another --out or empty it yourself") from e


def lock_output(out: Path, remote=None) -> WriterLock:
    """Take the writer lock: on the cache folder, or for a remote cache on the URL's local
    mirror folder (it excludes writers on this machine only). Checked first: a folder that is
    not a cache gets no lock file."""
    if remote is None:
        _check_folder(out)
    return WriterLock(remote.home if remote is not None else out).acquire()


def _differs(out, old: Manifest, m: Manifest) -> PipelineError:
    changed = sorted(k for k, v in m.identity().items() if old.identity().get(k) != v)
    return PipelineError(
        f"output {out} holds cache {old.cache_id}, made with different settings (differs in: "
        f"{', '.join(changed)}); pass --overwrite to replace it or choose another --out")


def prepare_output(out: Path, m: Manifest, overwrite: bool) -> list[int]:
    """Create the cache (manifest and every array's metadata), or check that an existing one is
    this one; returns chunks already done. Run by one process only, holding the writer lock:
    with several, the others start after it (creating the arrays from several processes at
    once races). --overwrite removes only the old cache's own entries (SPEC.md §1)."""
    _check_folder(out)
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        old = read_manifest(out)
        if old.cache_id != m.cache_id:
            if not overwrite:
                raise _differs(out, old, m)
            remove_cache(out)
        else:
            remove_own_leftovers(out)  # a killed writer's temporary files: not part of the cache
            open_arrays(out, m)  # a run killed before it created them all
            return list_done_chunks(out)
    try:
        write_manifest(out, m)
        open_arrays(out, m)
    except OSError as e:
        raise PipelineError(f"cannot write the cache to {out}: {e.strerror or e}") from e
    return []


def prepare_remote(remote, m: Manifest, overwrite: bool) -> Path:
    """prepare_output for a remote cache, in a fresh staging folder holding the bucket's
    metadata when it is this cache (the remote is the truth); then the manifest uploaded."""
    try:
        old = remote.remote_manifest()
    except CacheError as e:
        raise PipelineError(f"{remote.url} holds something that is not a usable cache ({e}); "
                            "choose another --out") from e
    if old is not None and old.cache_id != m.cache_id and not overwrite:
        raise _differs(remote.url, old, m)
    out = remote.folder(m.cache_id)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if old is not None and old.cache_id == m.cache_id:
        remote.pull_metadata()
    prepare_output(out, m, overwrite)
    if old is not None and old.cache_id != m.cache_id:
        remote.clear_remote()  # --overwrite of a different cache
    arrays = [p for p in sorted(out.rglob("zarr.json")) if p != out / "zarr.json"]
    remote.push([*arrays, out / "zarr.json"])  # every array's metadata, then the manifest
    return out


def uploader(out: Path, m: Manifest, remote):
    """For a remote cache: upload chunk k's files, then its record (so a record on the remote
    always means the chunk's data is there)."""
    if remote is None:
        return None
    specs = array_specs(m)

    def upload(k: int) -> None:
        remote.push([chunk_file(out, name, len(shape), k) for name, (shape, _) in specs.items()]
                    + [record_path(out, k)])
    return upload
