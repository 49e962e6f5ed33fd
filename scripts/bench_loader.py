"""Benchmark the loader against a plain sequential read of the same chunk files, in one run.
Prints one JSON object on stdout (progress on stderr). Target: ours / baseline >= 0.8.

Baselines: readinto of every chunk file of one stream into one reused buffer (the fastest plain
read; "ratio"), and np.fromfile of each file into a new array ("ratio_vs_fromfile"). Ours:
ActivationLoader batches (keep_special, so one epoch is exactly those bytes), timed from
construction to the batch that covers the same number of activation bytes: "ours" is the
default loader (chunks read into window buffers, each file checked against its chunk record's
XXH3-64 on its first read: every file, since each measurement is a new loader's first epoch),
"ours_unverified" the same with verify=False ("verify_ratio" = ours / ours_unverified, the
check's cost), "ours_mapped" the memory-mapped windows (opt-in, unverified; the loader's old
default) and "ours_mapped_verified" those with the check (hashing the mapped pages). Warm:
every file read once first (page cache). Cold: every file dropped from the page cache
(posix_fadvise DONTNEED) before each measurement, if that works. Each is repeated; medians are
reported.

    python scripts/bench_loader.py [--cache DIR] [--chunks 48] [--rows 8192] [--d-model 576]
                                   [--verify both|on|off] [--no-mapped]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cache_schema import activation_array, chunk_file, open_cache
from cache_schema.synthetic import write_synthetic_cache
from pipeline.data import ActivationLoader


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
    view = memoryview(bytearray(os.path.getsize(files[0])))
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


def ours(cache: Path, batch_size: int, n_bytes: int, mapped: bool, verify: bool
         ) -> tuple[int, float]:
    """Our loader, from construction to the batch that covers n_bytes of activations."""
    t = time.perf_counter()
    with ActivationLoader(cache, open_cache(cache).layers[0], batch_size=batch_size,
                          keep_special=True, verify=verify, mapped=mapped) as loader:
        total = 0
        while total < n_bytes:
            batch = next(loader)
            total += batch.shape[0] * batch.shape[1] * batch.element_size()
    return total, time.perf_counter() - t


def loaders(verify: str, mapped: bool) -> list[tuple[str, bool, bool]]:
    """(name, mapped, verify) of each loader variant to measure."""
    out = [("ours", False, True)] if verify in ("on", "both") else []
    if verify in ("off", "both"):
        out.append(("ours_unverified", False, False))
    if mapped:
        out.append(("ours_mapped", True, False))
        if verify in ("on", "both"):
            out.append(("ours_mapped_verified", True, True))
    return out


def measure(files: list[Path], cache: Path, batch_size: int, cold: bool,
            variants: list[tuple[str, bool, bool]]) -> dict:
    n_bytes = sum(os.path.getsize(p) for p in files)
    runs = {"baseline": lambda: baseline(files), "fromfile": lambda: fromfile(files)}
    for name, mapped, verify in variants:
        runs[name] = lambda mapped=mapped, verify=verify: ours(cache, batch_size, n_bytes,
                                                               mapped, verify)
    out: dict = {}
    for name, run in runs.items():
        if cold:
            out["dropped"] = drop_cache(files)
        else:
            baseline(files)  # make sure every file is in the page cache
        n, dt = run()
        out[name] = {"bytes": n, "seconds": dt, "GB_per_s": n / dt / 1e9}
    return out


def _ratio(runs: list[dict], a: str, b: str) -> float:
    return round(statistics.median(r[a]["GB_per_s"] / r[b]["GB_per_s"] for r in runs), 3)


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    names = [n for n in runs[0] if isinstance(runs[0][n], dict)]
    for name in names:
        gbs = [r[name]["GB_per_s"] for r in runs]
        secs = [r[name]["seconds"] for r in runs]
        out[name] = {"bytes": runs[0][name]["bytes"], "seconds": round(statistics.median(secs), 4),
                     "GB_per_s": round(statistics.median(gbs), 3)}
    main = "ours" if "ours" in names else "ours_unverified"
    if main in names:
        ratios = [r[main]["GB_per_s"] / r["baseline"]["GB_per_s"] for r in runs]
        out["ratio"] = round(statistics.median(ratios), 3)
        out["ratios"] = [round(x, 3) for x in ratios]
        out["ratio_vs_fromfile"] = _ratio(runs, main, "fromfile")
    if "ours" in names and "ours_unverified" in names:
        out["verify_ratio"] = _ratio(runs, "ours", "ours_unverified")
        out["verify_ratios"] = [round(r["ours"]["GB_per_s"] / r["ours_unverified"]["GB_per_s"], 3)
                                for r in runs]
    if "ours_mapped_verified" in names:
        out["verify_ratio_mapped"] = _ratio(runs, "ours_mapped_verified", "ours_mapped")
        out["ratio_vs_mapped_verified"] = _ratio(runs, "ours", "ours_mapped_verified")
    if "ours_mapped" in names:
        out["ratio_mapped"] = _ratio(runs, "ours_mapped", "baseline")
        if main in names:
            out["ratio_vs_mapped"] = _ratio(runs, main, "ours_mapped")
    if "dropped" in runs[0]:
        out["drop_worked"] = all(r["dropped"] for r in runs)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, help="an existing cache (default: write a synthetic one)")
    p.add_argument("--chunks", type=int, default=48)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default="/tmp", help="where the synthetic cache is written")
    p.add_argument("--verify", choices=("both", "on", "off"), default="both",
                   help="measure the loader with the chunk checks, without, or both")
    p.add_argument("--no-mapped", dest="mapped", action="store_false",
                   help="skip the memory-mapped (unverified) variant")
    p.add_argument("--modes", default="warm,cold", help="warm, cold or both (comma-separated)")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="bench_loader_", dir=args.dir)
    cache = args.cache
    if cache is None:
        cache = Path(tmp.name) / "cache"
        log(f"writing a synthetic cache: {args.chunks} chunks x {args.rows} rows x "
            f"{args.d_model} float32 to {cache}")
        write_synthetic_cache(cache, n_chunks=args.chunks, rows_per_chunk=args.rows,
                              d_model=args.d_model, context_length=128, index_column=False)
    files = chunk_files(cache)
    m = open_cache(cache)
    with ActivationLoader(cache, m.layers[0], batch_size=args.batch_size) as probe:
        mapped, host_bytes = probe._pipe.mapped, probe.host_bytes
    variants = loaders(args.verify, args.mapped)
    result = {"cache_bytes_one_stream": sum(os.path.getsize(f) for f in files),
              "chunks": m.n_chunks, "rows_per_chunk": m.rows_per_chunk, "d_model": m.d_model,
              "storage_dtype": m.storage_dtype, "batch_size": args.batch_size,
              "cpus": os.cpu_count(), "mapped": mapped, "loader_host_bytes": host_bytes}
    for mode in args.modes.split(","):
        runs = []
        for i in range(args.repeats):
            runs.append(measure(files, cache, args.batch_size, mode == "cold", variants))
            log(f"{mode} {i}: " + ", ".join(f"{k} {v['GB_per_s']:.2f} GB/s"
                                            for k, v in runs[-1].items() if isinstance(v, dict)))
        result[mode] = summarise(runs)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
