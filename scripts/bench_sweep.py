"""Benchmark `pipeline sweep` against the same SAEs trained by sequential `pipeline train` runs,
in one run on the same cache. Prints one JSON object on stdout (progress on stderr).
Target on CPU: a sweep of 4 small SAEs at least 2.5x faster in wall clock.

    python scripts/bench_sweep.py [--cache DIR] [--steps 300] [--d-model 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cache_schema.synthetic import write_synthetic_cache

GRID = ["arch=relu,masked", "l1=0.001,0.004"]


def timed(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def small_sweep(description: str, prefix: str) -> tuple[argparse.Namespace, Path, list[str]]:
    """The set-up bench_sweep and bench_distributed share: their arguments, a temporary folder
    (with a synthetic cache unless --cache is given), and the training flags of the 4 small
    SAEs both time."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--cache", type=Path)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    cache = args.cache or tmp / "cache"
    if not cache.exists():
        print(f"writing a synthetic cache to {cache}", file=sys.stderr)
        write_synthetic_cache(cache, n_chunks=16, rows_per_chunk=1024, d_model=args.d_model,
                              context_length=64, index_column=False)
    common = ["--cache", str(cache), "--steps", str(args.steps), "--batch-size",
              str(args.batch_size), "--expansion", "4", "--log-every", "50",
              "--checkpoint-every", "100", "--device", "cpu", "--no-progress"]
    return args, tmp, common


def main() -> None:
    args, tmp, common = small_sweep(__doc__.splitlines()[0], "bench_sweep_")
    print("4 sequential `pipeline train` runs", file=sys.stderr)
    sequential = 0.0
    for arch in ("relu", "masked"):
        for l1 in ("0.001", "0.004"):
            sequential += timed(["train", *common, "--arch", arch, "--l1", l1,
                                 "-o", str(tmp / f"train-{arch}-{l1}")])
    print("one `pipeline sweep` of the same 4", file=sys.stderr)
    swept = timed(["sweep", *common, "-o", str(tmp / "sweep"),
                   *[x for g in GRID for x in ("--set", g)]])
    print(json.dumps({"saes": 4, "steps": args.steps, "batch_size": args.batch_size,
                      "d_model": args.d_model, "d_sae": 4 * args.d_model,
                      "sequential_train_s": round(sequential, 2), "sweep_s": round(swept, 2),
                      "speedup": round(sequential / swept, 2)}, indent=1))


if __name__ == "__main__":
    main()
