"""Benchmark the loader against a plain sequential read of the same chunk files, in one run.
Prints one JSON object on stdout (progress on stderr). Target: ours / baseline >= 0.8.

Baselines: readinto one reused buffer (the fastest plain read; "ratio") and np.fromfile of each
file into a new array ("ratio_vs_fromfile"). Warm: all read from the page cache (files read once
first). Cold: every file is dropped from the page cache with posix_fadvise(DONTNEED) before each
measurement (reported if that worked).

    python scripts/bench_loader.py [--cache DIR] [--chunks 48] [--rows 8192] [--d-model 576]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cache_schema import activation_array, chunk_file, open_cache
from pipeline.data import ActivationLoader
from pipeline.data.synthetic import write_synthetic_cache


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def chunk_files(cache: Path) -> list[Path]:
    m = open_cache(cache)
    name = activation_array("clean", m.hooks[0])
    return [chunk_file(cache, name, 2, k) for k in range(m.n_chunks)]


def drop_cache(files: list[Path]) -> bool:
    try:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def baseline(files: list[Path]) -> tuple[int, float]:
    """Sequential readinto of every chunk file into one reused buffer."""
    buf = bytearray(os.path.getsize(files[0]))
    view = memoryview(buf)
    total, t = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            total += f.readinto(view)
    return total, time.perf_counter() - t


def fromfile(files: list[Path]) -> tuple[int, float]:
    """The plainest read: np.fromfile of each chunk file into a new array."""
    total, t = 0, time.perf_counter()
    for path in files:
        total += np.fromfile(path, dtype=np.uint8).nbytes
    return total, time.perf_counter() - t


def ours(cache: Path, batch_size: int, n_bytes: int) -> tuple[int, float]:
    """Our loader, timed from construction to the batch that covers n_bytes of activations."""
    t = time.perf_counter()
    with ActivationLoader(cache, open_cache(cache).layers[0], batch_size=batch_size,
                          keep_special=True) as loader:
        total = 0
        while total < n_bytes:
            batch = next(loader)
            total += batch.shape[0] * batch.shape[1] * batch.element_size()
        return total, time.perf_counter() - t


def measure(files, cache, batch_size, cold: bool) -> dict:
    out = {}
    for name in ("baseline", "fromfile", "ours"):
        if cold:
            out["dropped"] = drop_cache(files)
        else:
            baseline(files)  # warm the page cache
        if name == "baseline":
            n, dt = baseline(files)
        elif name == "fromfile":
            n, dt = fromfile(files)
        else:
            n, dt = ours(cache, batch_size, sum(os.path.getsize(p) for p in files))
        out[name] = {"bytes": n, "seconds": round(dt, 4), "GB_per_s": round(n / dt / 1e9, 3)}
    out["ratio"] = round(out["ours"]["GB_per_s"] / out["baseline"]["GB_per_s"], 3)
    out["ratio_vs_fromfile"] = round(out["ours"]["GB_per_s"] / out["fromfile"]["GB_per_s"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path)
    p.add_argument("--chunks", type=int, default=48)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="bench_loader_", dir="/tmp")
    cache = args.cache
    if cache is None:
        cache = Path(tmp.name) / "cache"
        log(f"writing a synthetic cache: {args.chunks} chunks x {args.rows} rows x "
            f"{args.d_model} float32 to {cache}")
        write_synthetic_cache(cache, n_chunks=args.chunks, rows_per_chunk=args.rows,
                              d_model=args.d_model, context_length=128, index_column=False)
    files = chunk_files(cache)
    result = {"cache_bytes_one_stream": sum(os.path.getsize(f) for f in files),
              "batch_size": args.batch_size, "d_model": open_cache(cache).d_model}
    for mode in ("warm", "cold"):
        runs = [measure(files, cache, args.batch_size, cold=mode == "cold")
                for _ in range(args.repeats)]
        log(f"{mode}: ratios {[r['ratio'] for r in runs]}")
        best = max(runs, key=lambda r: r["ratio"])
        result[mode] = {**best, "ratios": [r["ratio"] for r in runs],
                        "median_ratio": float(np.median([r["ratio"] for r in runs])),
                        "median_ratio_vs_fromfile": float(np.median(
                            [r["ratio_vs_fromfile"] for r in runs]))}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
