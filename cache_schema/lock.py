"""The writer lock of a cache: one `extract` job at a time per cache folder.

An advisory `fcntl.flock` on `<root>/.lock`, taken without waiting. The kernel drops it when the
holding process ends (even by kill -9), so a stale lock never blocks a resume. The file itself is
never deleted: unlinking a lock file lets two processes lock two different inodes of one name.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cache_schema.errors import CacheError

LOCK_NAME = ".lock"


class WriterLock:
    """An exclusive lock on a cache folder, held until `release` (or the process ends)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        """Take the lock (creating the folder and the lock file); CacheError if another
        process holds it or the folder cannot be written."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise CacheError(f"cannot write the cache to {self.path.parent}: "
                             f"{e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheError(
                f"cache folder {self.path.parent} is being written by another `pipeline extract` "
                f"job (it holds the lock {self.path}); wait for that job to finish, or choose "
                "another --out. Nothing was changed.") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
