"""Caches on object storage (s3://, gs://, ... through fsspec) with a local read-through mirror.

A remote cache is used through a local folder under PIPELINE_HOME/remote/<hash of the URL>:
readers download its metadata (zarr.json files and chunk records) when they open it and each
chunk file the first time it is read; `extract --out URL` writes the cache in that folder and
uploads every chunk's files, then its record, as soon as the chunk is done (the manifest first
as 'writing' and last as 'complete'), so an interrupted upload resumes like a crash.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.errors import PipelineError

_MIRRORS: dict[Path, Mirror] = {}


def is_remote(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


class Mirror:
    """A remote cache URL and its local folder."""

    def __init__(self, url: str):
        import fsspec

        from pipeline.extract.model import cache_home

        self.url = url.rstrip("/")
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            raise PipelineError(f"cannot open {url}: {e} (s3:// needs `pip install s3fs`)") from e
        self.root = cache_home() / "remote" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.root.mkdir(parents=True, exist_ok=True)
        self.pulled = False

    def _remote(self, local: Path) -> str:
        return f"{self.base}/{local.relative_to(self.root).as_posix()}"

    def pull_metadata(self) -> bool:
        """Download zarr.json files and chunk records; False when there is no cache there."""
        self.fs.invalidate_cache()
        try:
            names = [p for p in self.fs.find(self.base)
                     if p.endswith("zarr.json") or "/_chunks/" in p]
        except FileNotFoundError:
            return False
        for name in names:
            local = self.root / name[len(self.base):].lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(name, str(local))
        self.pulled = any(n == f"{self.base}/zarr.json" for n in names)
        return self.pulled

    def fetch(self, local: Path) -> None:
        """Make sure a chunk file is in the mirror (download to a temporary name, then rename)."""
        if local.is_file():
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}.{os.getpid()}.part")
        try:
            self.fs.get_file(self._remote(local), str(tmp))
        except FileNotFoundError:
            return  # the reader reports the missing chunk with its usual message
        os.replace(tmp, local)

    def clear_remote(self) -> None:
        """Delete the remote cache (for --overwrite)."""
        if self.fs.exists(self.base):
            self.fs.rm(self.base, recursive=True)

    def push(self, paths: list[Path]) -> None:
        """Upload files of the mirror to the remote cache, in the order given."""
        for path in paths:
            self.fs.put_file(str(path), self._remote(path))


def mirror(url: str) -> Mirror:
    """The (one per process) mirror of a remote cache URL."""
    root_key = next((r for r, m in _MIRRORS.items() if m.url == url.rstrip("/")), None)
    if root_key is not None:
        return _MIRRORS[root_key]
    m = Mirror(url)
    _MIRRORS[m.root] = m
    return m


def local_cache(path: str | os.PathLike) -> Path:
    """The local folder to read a cache from: the path itself, or the mirror of a remote cache
    (metadata downloaded, chunk files fetched on first read through `fetcher`)."""
    if not is_remote(path):
        return Path(path)
    m = mirror(str(path))
    if not m.pulled and not m.pull_metadata():
        raise PipelineError(f"no cache at {path}: there is no zarr.json under that prefix")
    return m.root


def fetcher(root: Path):
    """The chunk fetcher of a mirror folder, or None for a local cache."""
    m = _MIRRORS.get(Path(root))
    return m.fetch if m is not None else None
