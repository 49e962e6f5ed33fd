"""Remove a cache from its folder without touching anything else there (for --overwrite)."""

from __future__ import annotations

import shutil
from pathlib import Path

from cache_schema.files import tree_bytes
from cache_schema.lock import LOCK_NAME
from cache_schema.manifest import STREAMS
from cache_schema.store import LEFTOVER_SUFFIXES, RECORDS_DIR, TOKEN_ARRAYS

# Top-level entries a cache owns (SPEC.md §1); the lock stays, its holder is the one clearing.
OWN_ENTRIES = ("zarr.json", *TOKEN_ARRAYS, *STREAMS, RECORDS_DIR)


def own_entries(root: str | Path) -> list[Path]:
    """The cache's own top-level entries present in root (not the lock, not foreign files)."""
    root = Path(root)
    found = [root / name for name in OWN_ENTRIES if (root / name).is_symlink()
             or (root / name).exists()]
    found += [p for p in sorted(root.iterdir()) if p.name != LOCK_NAME
              and p.name.endswith(LEFTOVER_SUFFIXES)]
    return found


def own_bytes(root: str | Path) -> int:
    """Bytes of the files in the cache's own entries in root (links not followed)."""
    return sum(tree_bytes(entry) for entry in own_entries(root))


def remove_cache(root: str | Path) -> None:
    """Delete the cache's own entries in root. A symlinked root is cleared where it points;
    links inside are removed as links, never followed."""
    for p in own_entries(Path(root).resolve()):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def remove_own_leftovers(root: str | Path) -> list[Path]:
    """Delete interrupted writes (SPEC.md §1) inside the cache's own entries only: a `.tmp` in a
    user's folder beside the cache is not ours. Only call this while holding the writer lock."""
    gone = []
    for entry in own_entries(root):
        paths = entry.rglob("*") if entry.is_dir() and not entry.is_symlink() else [entry]
        for p in paths:
            if p.name.endswith(LEFTOVER_SUFFIXES) and p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone
