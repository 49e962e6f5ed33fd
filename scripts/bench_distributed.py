"""Benchmark a launched sweep on CPU: 4 SAEs dealt to 2 processes of 1 thread each (torchrun,
gloo) against one process with 2 threads training all 4, in one run on the same cache and
machine. Prints one JSON object on stdout (progress on stderr); checks that both give the same
SAE bytes.

    python scripts/bench_distributed.py [--cache DIR] [--steps 300] [--d-model 64]
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_sweep import small_sweep

GRID = ["arch=relu,masked", "l1=0.001,0.004"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(launcher: list[str], args: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    t = time.perf_counter()
    subprocess.run([*launcher, *args], check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t


def training_rate(sweep: Path) -> float:
    """SAE steps per second of the training loops, without start-up: the median logged loop
    rate x 4 (one process steps 4 SAEs a loop; each of 2 processes steps 2)."""
    rates = []
    for metrics in sweep.glob("*/metrics.jsonl"):
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        rates += [r["steps_per_s"] for r in rows[1:] if r.get("steps_per_s")]
    return 4 * statistics.median(rates)


def weights(sweep: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sweep.glob("*/sae_weights.safetensors")}


def main() -> None:
    args, tmp, flags = small_sweep(__doc__.splitlines()[0], "bench_distributed_")
    common = ["sweep", *flags, *[x for g in GRID for x in ("--set", g)]]
    print("one process x 2 threads, 4 SAEs", file=sys.stderr)
    one = timed([sys.executable, "-m", "pipeline.cli"], [*common, "-o", str(tmp / "one")], 2)
    print("2 processes x 1 thread, 2 SAEs each", file=sys.stderr)
    two = timed([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m",
                 "pipeline.cli"], [*common, "-o", str(tmp / "two")], 1)
    same = weights(tmp / "one") == weights(tmp / "two") and len(weights(tmp / "one")) == 4
    total = 4 * args.steps
    print(json.dumps({
        "saes": 4, "steps": args.steps, "batch_size": args.batch_size, "d_model": args.d_model,
        "d_sae": 4 * args.d_model, "cpu_count": os.cpu_count(),
        "one_process_2_threads": {"wall_s": round(one, 2),
                                  "sae_steps_per_s": round(total / one, 1),
                                  "training_sae_steps_per_s": round(training_rate(tmp / "one"), 1)},
        "two_processes_1_thread": {"wall_s": round(two, 2),
                                   "sae_steps_per_s": round(total / two, 1),
                                   "training_sae_steps_per_s": round(training_rate(tmp / "two"), 1)},
        "wall_speedup": round(one / two, 2), "same_weights": same}, indent=1))


if __name__ == "__main__":
    main()
