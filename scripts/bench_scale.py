"""A cache larger than memory, end to end. Prints one JSON object on stdout (progress on stderr).

In one run, on one synthetic bfloat16 cache of about --ram-fraction x this machine's RAM (every
chunk file written and checksummed; activations repeat every 8 chunks, so it is written at disk
speed, but each chunk is its own file on disk and in the page cache):
  (a) `pipeline train` through the loader against the same step on in-memory batches (the
      median steps/s of its metrics.jsonl after warm-up, against TrainStep on batches already in
      memory, same shapes: target >= 0.95 at d_sae 4608 on CPU), and its peak RSS;
  (b) one epoch of the loader alone over the whole cache in a child process: peak RSS against
      the cache size (the loader's windows bound it) and GB/s;
  (c) `pipeline verify` GB/s against a sequential read of the same files;
  (d) `pipeline train` killed with SIGKILL after its first checkpoint, resumed, against an
      uninterrupted run: the final weights must be identical.
Everything it writes lives in one temporary folder, removed at the end (also on error).

    python scripts/bench_scale.py [--ram-fraction 1.5] [--dir /tmp] [--steps 30] [--d-model 576]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cache_schema import activation_array, chunk_file, open_cache
from cache_schema.synthetic import write_synthetic_cache
from pipeline.sae import build_sae, sae_config
from pipeline.train.step import TrainStep

R = 16384  # rows per chunk: 18 MiB per stream in bfloat16 at d_model 576


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def child(args: list[str], env: dict | None = None) -> tuple[float, int]:
    """Run a command; (seconds, its peak RSS in bytes, from the kernel's accounting)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return time.perf_counter() - t, max(after, before) * 1024  # ru_maxrss is in KiB on Linux


def train_args(cache: Path, out: Path, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", "--cache", str(cache), "-o", str(out),
            "--steps", str(steps), "--batch-size", "4096", "--expansion", "8", "--device", "cpu",
            "--log-every", "5", "--no-progress", *extra]


def in_memory_steps_per_s(d_model: int, steps: int) -> float:
    """The same step (relu, d_sae 8 x d_model, batch 4096) on batches already in memory."""
    sae = build_sae(sae_config("relu", d_model, 8 * d_model), torch.Generator().manual_seed(0))
    step = TrainStep(sae, 4096, d_model, 1.0, steps + 3, 1e-3)
    batches = [torch.randn(4096, d_model) for _ in range(4)]
    for i in range(3):
        step.load(batches[i % 4])
        step.run()
    t = time.perf_counter()
    for i in range(steps):
        step.load(batches[i % 4])
        step.run()
    return steps / (time.perf_counter() - t)


def loader_epoch(cache: Path) -> dict:
    code = ("import sys, time; from pipeline.data import ActivationLoader\n"
            "L = ActivationLoader(sys.argv[1], 0, batch_size=4096, keep_special=True)\n"
            "n, t = 0, time.perf_counter()\n"
            "while n < L.rows_per_epoch:\n"
            "    n += len(next(L))\n"
            "import resource\n"
            "print(n * L.d_model * 2 / (time.perf_counter() - t) / 1e9, n * L.d_model * 2,\n"
            "      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(cache)], check=True,
                         capture_output=True, text=True)
    rate, read, rss = out.stdout.split()
    return {"GB_per_s": round(float(rate), 3), "bytes_read": int(read),
            "peak_rss_bytes": int(rss)}


def sequential_read(files: list[Path]) -> float:
    buf = memoryview(bytearray(1 << 24))
    total, t = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total / (time.perf_counter() - t) / 1e9


def kill_and_resume(cache: Path, work: Path, steps: int) -> dict:
    whole, resumed = work / "whole", work / "resumed"
    every = ("--checkpoint-every", "5")  # a multiple of train_args' --log-every
    subprocess.run(train_args(cache, whole, steps, every), check=True, stdout=subprocess.DEVNULL)
    proc = subprocess.Popen(train_args(cache, resumed, steps, every), stdout=subprocess.DEVNULL)
    while proc.poll() is None and not any((resumed / "checkpoints").glob("*/state.safetensors")):
        time.sleep(0.2)
    killed = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(train_args(cache, resumed, steps, (*every, "--resume")), check=True,
                   stdout=subprocess.DEVNULL)
    a, b = (load_file(str(d / "sae_weights.safetensors")) for d in (whole, resumed))
    return {"killed_mid_run": killed, "identical_weights": all(torch.equal(a[k], b[k]) for k in a)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ram-fraction", type=float, default=1.5)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--d-model", type=int, default=576)
    args = p.parse_args()
    per_row = 2 * args.d_model * 2 + 13
    n_chunks = int(args.ram_fraction * ram_bytes() / (R * per_row)) + 1
    work = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=args.dir))
    try:
        cache = work / "cache"
        log(f"writing {n_chunks} chunks ({n_chunks * R * per_row / 1e9:.1f} GB) to {cache}")
        t = time.perf_counter()
        write_synthetic_cache(cache, n_chunks=n_chunks, rows_per_chunk=R, d_model=args.d_model,
                              context_length=128, storage_dtype="bfloat16", index_column=False,
                              distinct_chunks=8)
        out = {"ram_bytes": ram_bytes(), "cache_bytes": sum(
            f.stat().st_size for f in cache.rglob("*") if f.is_file()),
            "write_seconds": round(time.perf_counter() - t, 1), "cpus": os.cpu_count()}
        log("training through the loader")
        seconds, rss = child(train_args(cache, work / "run", args.steps))
        rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        rates = [r["steps_per_s"] for r in rows[1:] if r.get("steps_per_s")]
        ours = statistics.median(rates)
        log("the same step on in-memory batches")
        base = in_memory_steps_per_s(args.d_model, args.steps)
        out["train"] = {"d_sae": 8 * args.d_model, "batch_size": 4096, "steps": args.steps,
                        "loader_steps_per_s": round(ours, 4), "in_memory_steps_per_s": round(base, 4),
                        "ratio": round(ours / base, 3), "target": 0.95, "met": ours / base >= 0.95,
                        "peak_rss_bytes": rss, "seconds": round(seconds, 1)}
        log("one loader epoch over the whole cache")
        out["loader_epoch"] = loader_epoch(cache)
        log("pipeline verify against a sequential read")
        m = open_cache(cache)
        files = [p for p in cache.rglob("*") if p.is_file() and "/c/" in str(p)]
        seconds, _ = child([sys.executable, "-m", "pipeline.cli", "verify", str(cache)])
        data = sum(f.stat().st_size for f in files)
        seq = sequential_read(files)  # after verify: each read starts from what verify left cached
        out["verify"] = {"GB_per_s": round(data / seconds / 1e9, 3),
                         "sequential_read_GB_per_s": round(seq, 3),
                         "ratio": round(data / seconds / 1e9 / seq, 3)}
        assert chunk_file(cache, activation_array("clean", m.hooks[0]), 2, 0).is_file()
        log("kill -9 and resume against an uninterrupted run")
        out["kill_resume"] = kill_and_resume(cache, work, 15)
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
