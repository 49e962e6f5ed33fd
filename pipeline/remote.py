"""Caches on object storage (s3://, gs://, ... through fsspec) with a local read-through mirror.

A remote cache is used through a local folder PIPELINE_HOME/remote/<hash of the URL>/<cache id>:
readers download its metadata (zarr.json files and chunk records) when they open it and each
chunk file the first time it is read, checked against the SHA-256 in its chunk record before it
enters the mirror; a cache replaced in the bucket (a new id) gets a fresh folder, so chunks of
the old one are never read for it. `extract --out URL` writes the cache in that folder and
uploads every chunk's files, then its record, as soon as the chunk is done (the manifest first
as 'writing' and last as 'complete'), so an interrupted upload resumes like a crash.
Each process holds a shared lock on every cache id folder it uses; a reader that finds a new id
in the bucket removes the folders of the URL's other ids that no process holds.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cache_schema import (
    CacheError,
    Manifest,
    array_specs,
    chunk_file,
    list_done_chunks,
    read_chunk_record,
    read_manifest,
    verify,
)
from cache_schema.clear import OWN_ENTRIES
from cache_schema.files import file_sha256, tree_bytes
from pipeline.errors import PipelineError
from pipeline.home import cache_home

_MIRRORS: dict[str, Mirror] = {}

# The only remote names a mirror downloads as metadata (SPEC.md §1); anything else under the
# prefix is ignored, so a hostile key such as `_chunks/../../x` is never written locally.
_METADATA = re.compile(r"(?:(?:tokens|masked_tokens|is_masked|seq|clean|masked)/)?zarr\.json"
                       r"|(?:clean|masked)/blocks\.\d+\.hook_resid_post/zarr\.json"
                       r"|_chunks/\d{8}\.json")
# A chunk file: <array>/c/<k> or <array>/c/<k>/0.
_CHUNK = re.compile(r"(?P<array>.+)/c/(?P<k>\d+)(?:/0)?")
_CACHE_ID = re.compile(r"[0-9a-f]{16}")


def is_remote(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


def _hint(url: str, error: Exception) -> str:
    """What to check for a storage failure: the local disk when it is full, else the network
    and the settings of the URL's storage."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"The local disk under {cache_home()} is full: free space there or set PIPELINE_HOME"
    scheme = url.split("://", 1)[0]
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        where = "AWS_ENDPOINT_URL=" + endpoint if endpoint else "AWS_ENDPOINT_URL unset"
        return (f"Check the network, the endpoint ({where}) and the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_PROFILE)")
    if scheme in ("gs", "gcs"):
        return "Check the network and the credentials (GOOGLE_APPLICATION_CREDENTIALS)"
    return f"Check the network and the credentials of {scheme}://"


class Mirror:
    """A remote cache URL and its local folders: `home` for the URL (the writer's lock lives
    there), `root` for the cache id the bucket holds (None until known)."""

    def __init__(self, url: str):
        import fsspec  # the s3 extra: only remote caches need it

        self.url = url.rstrip("/")
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            raise PipelineError(f"cannot open {url}: {e} (s3:// needs `pip install s3fs`)") from e
        self.home = cache_home() / "remote" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.home.mkdir(parents=True, exist_ok=True)
        self.root: Path | None = None
        self.pulled = False
        self._in_use: dict[str, int] = {}  # cache id: the descriptor of its shared lock

    @contextmanager
    def _storage(self, what: str) -> Iterator[None]:
        """Any failure of the storage other than a missing key (no connection, refused
        credentials, a throttled or broken endpoint) as one paragraph naming the URL."""
        try:
            yield
        except (FileNotFoundError, PipelineError, CacheError):
            raise
        except Exception as e:  # botocore's, aiohttp's, gcsfs's... errors: no common base
            raise PipelineError(
                f"cannot {what} {self.url}: {type(e).__name__}: {e}. {_hint(self.url, e)}, then "
                "run the same command again: what was written or mirrored so far is kept") from e

    def _lock(self, cache_id: str) -> int:
        return os.open(self.home / f".{cache_id}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                       0o644)

    def folder(self, cache_id: str) -> Path:
        """The mirror folder of one cache id of this URL (also the writer's staging folder),
        held in use by this process until it ends (waits while another prunes it)."""
        while cache_id not in self._in_use:
            fd = self._lock(cache_id)
            fcntl.flock(fd, fcntl.LOCK_SH)
            path = self.home / f".{cache_id}.lock"  # a prune removes the lock file it held:
            if path.exists() and os.path.samestat(path.stat(), os.fstat(fd)):  # else retry
                self._in_use[cache_id] = fd
            else:
                os.close(fd)
        self.root = self.home / cache_id
        return self.root

    def release(self) -> None:
        """Stop holding this process's cache id folders (a process's end does the same)."""
        for fd in self._in_use.values():
            os.close(fd)
        self._in_use.clear()

    def prune(self) -> None:
        """Remove the folders of this URL's other cache ids (caches the bucket held before)
        that no process holds, and say what that freed."""
        for old in sorted(self.home.iterdir()):
            if old.name in self._in_use or not old.is_dir() or not _CACHE_ID.fullmatch(old.name):
                continue
            fd = self._lock(old.name)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                size = tree_bytes(old)
                shutil.rmtree(old, ignore_errors=True)
                os.unlink(self.home / f".{old.name}.lock")  # under the lock: see folder()
                print(f"note: removed the local mirror of cache {old.name}, which {self.url} "
                      f"held before {self.root.name} ({size / 1e9:.2f} GB)", file=sys.stderr)
            except BlockingIOError:
                continue  # a process still reads (or writes) that cache
            finally:
                os.close(fd)

    def _remote(self, local: Path) -> str:
        return f"{self.base}/{local.relative_to(self.root).as_posix()}"

    def _get(self, name: str, local: Path) -> None:
        """Download to a temporary name, then rename (concurrent readers never see half a file)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial(local)
        self.fs.get_file(name, str(tmp))
        os.replace(tmp, local)

    def remote_manifest(self) -> Manifest | None:
        """The manifest in the bucket, or None when there is no zarr.json under the prefix."""
        self.fs.invalidate_cache()
        incoming = self.home / f".incoming.{os.getpid()}"
        shutil.rmtree(incoming, ignore_errors=True)
        try:
            with self._storage("read the manifest of"):
                self._get(f"{self.base}/zarr.json", incoming / "zarr.json")
        except FileNotFoundError:
            return None
        try:
            return read_manifest(incoming)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    def pull_metadata(self) -> bool:
        """Download zarr.json files and chunk records into the folder of the bucket's cache id;
        False when there is no cache there."""
        m = self.remote_manifest()
        if m is None:
            return False
        root = self.folder(m.cache_id)
        try:
            with self._storage("list"):
                names = self.fs.find(self.base)
        except FileNotFoundError:
            return False
        for name in names:
            rel = name[len(self.base):].lstrip("/")
            local = root / rel
            if not _METADATA.fullmatch(rel) or not local.resolve().is_relative_to(root.resolve()):
                continue
            with self._storage("download the metadata of"):
                self._get(name, local)
        self.pulled = True
        self.prune()
        return True

    def fetch(self, local: Path, again: bool = False) -> None:
        """Make sure a chunk file is in the mirror: download it and check its SHA-256 against
        the chunk record before it takes its name there (again: check the bucket's copy even
        when the mirror has one)."""
        if local.is_file() and not again:
            return
        match = _CHUNK.fullmatch(local.relative_to(self.root).as_posix())
        if match is None:
            raise PipelineError(f"{local} is not a chunk file of the cache at {self.url}")
        array, k = match["array"], int(match["k"])
        expected = read_chunk_record(self.root, k).get("checksums", {}).get(array)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial(local)
        try:
            with self._storage(f"download chunk {k} of {array} from"):
                self.fs.get_file(self._remote(local), str(tmp))
        except FileNotFoundError:
            if again:  # the mirror may hold a copy; the bucket's file is what is checked
                raise PipelineError(f"chunk {k} of {array} is missing from {self.url}") from None
            return  # the reader reports the missing chunk with its usual message
        got = file_sha256(tmp)
        if got != expected:
            tmp.unlink(missing_ok=True)
            raise PipelineError(
                f"chunk {k} of {array} downloaded from {self.url} has SHA-256 {got[:16]}..., but "
                f"its chunk record says {str(expected)[:16]}...: the remote cache is corrupt or "
                "being replaced; run `pipeline verify` on it, and re-run the extraction if it "
                "stays bad (nothing was kept in the mirror)")
        os.replace(tmp, local)

    def clear_remote(self) -> None:
        """Delete the remote cache's own entries (for --overwrite); other keys stay."""
        with self._storage("delete the old cache at"):
            for name in OWN_ENTRIES:
                if self.fs.exists(f"{self.base}/{name}"):
                    self.fs.rm(f"{self.base}/{name}", recursive=True)

    def push(self, paths: list[Path]) -> None:
        """Upload files of the mirror to the remote cache, in the order given."""
        with self._storage("upload to"):
            for path in paths:
                self.fs.put_file(str(path), self._remote(path))


def _partial(local: Path) -> Path:
    """A download's temporary name, unique per process and thread (the loader reads in threads)."""
    return local.with_name(f"{local.name}.{os.getpid()}-{threading.get_ident()}.partial")


def mirror(url: str) -> Mirror:
    """The (one per process) mirror of a remote cache URL."""
    key = url.rstrip("/")
    if key not in _MIRRORS:
        _MIRRORS[key] = Mirror(key)
    return _MIRRORS[key]


def local_cache(path: str | os.PathLike) -> Path:
    """The local folder to read a cache from: the path itself, or the mirror of a remote cache
    (metadata downloaded, chunk files fetched on first read through `fetcher`)."""
    if not is_remote(path):
        return Path(path)
    m = mirror(str(path))
    try:
        if not m.pulled and not m.pull_metadata():
            raise PipelineError(f"no cache at {path}: there is no zarr.json under that prefix")
    except CacheError as e:
        raise PipelineError(f"the cache at {path} is not usable: {e}") from e
    return m.root


def fetcher(root: Path):
    """The chunk fetcher of a mirror folder, or None for a local cache."""
    m = next((m for m in _MIRRORS.values() if m.root == Path(root)), None)
    return m.fetch if m is not None else None


def fetch_all(root: Path, m: Manifest) -> dict[tuple[int, str], str]:
    """Download every recorded chunk file of a mirrored cache (for verify: the bucket's bytes,
    also where the mirror holds a copy): the refused downloads, by (chunk, array). Chunks
    without a record are left to verify to report."""
    fetch = fetcher(root)
    problems = {}
    for k in list_done_chunks(root):
        for name, (shape, _) in array_specs(m).items():
            try:
                fetch(chunk_file(root, name, len(shape), k), again=True)
            except (PipelineError, CacheError) as e:
                problems[k, name] = str(e)
    return problems


def verify_any(path: str | os.PathLike) -> tuple[Manifest, list[str]]:
    """`cache_schema.verify` of a local cache, or of a remote one through its mirror (every
    chunk file downloaded and checked first; a refused download is that chunk's problem)."""
    root = local_cache(path)
    refused = fetch_all(root, read_manifest(root)) if is_remote(path) else {}
    m, problems = verify(root)
    problems = [p for p in problems  # a refused download also reads as a missing file there
                if not any(p.startswith(f"chunk {k}: {name} ") for k, name in refused)]
    return m, [f"chunk {k}: {name}: {e}" for (k, name), e in refused.items()] + problems
