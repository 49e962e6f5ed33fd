"""The C kernels of the k-sparse CPU step (pipeline/sae/kernels.c) against the torch paths they
replace, on the same inputs (d_in 576, batch 4096, k 32 and each --shapes d_sae): each kernel
alone (median ms), then the whole topk training step with the kernels (the default) and with
PIPELINE_NATIVE=0, one step of each in turn in the same process (the switch is read at every
call), so that the shared machine's drift hits both alike: median step times. The process
keeps freed memory as TrainStep does (pipeline.train.memory). Prints one JSON object.

    python scripts/bench_kernels.py [--shapes 4608,18432,73728] [--rounds 8] [--no-step]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from pipeline.sae import build_sae, native, sae_config
from pipeline.sae.sparse import _per_batch, entry_dots, outer_sum, row_topk
from pipeline.train.memory import keep_freed_memory
from pipeline.train.step import TrainStep

D_IN, BATCH, K = 576, 4096, 32


def median_ms(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def both(fn) -> dict:
    """fn timed with the kernels and with PIPELINE_NATIVE=0 (torch's path)."""
    out = {}
    for name, flag in (("kernel_ms", "1"), ("torch_ms", "0")):
        os.environ["PIPELINE_NATIVE"] = flag
        out[name] = median_ms(fn)
    os.environ["PIPELINE_NATIVE"] = "1"
    out["speedup"] = out["torch_ms"] / out["kernel_ms"]
    return out


def kernels(d_sae: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, D_IN, generator=gen)
    w_enc = torch.randn(d_sae, D_IN, generator=gen).t() / D_IN**0.5
    b_enc = torch.randn(d_sae, generator=gen) * 0.1
    pre = torch.empty(BATCH, d_sae)
    mm = median_ms(lambda: torch.mm(x, w_enc, out=pre), 3)
    # what the encoder's addmm adds to the matmul: the bias broadcast into its output first
    bias_copy = median_ms(lambda: pre.copy_(b_enc.expand_as(pre)))
    with_bias = torch.addmm(b_enc, x, w_enc)
    torch.mm(x, w_enc, out=pre)
    latents = row_topk(pre, K, b_enc)[1].reshape(-1)
    rows = torch.arange(BATCH).repeat_interleave(K)
    offsets = torch.arange(0, BATCH * K, K)
    g = torch.randn(BATCH * K, generator=gen)
    w_dec = torch.randn(d_sae, D_IN, generator=gen)
    # the kernel adds the bias itself; torch's path needs it in pre (the encoder's addmm)
    topk = {"kernel_ms": median_ms(lambda: row_topk(pre, K, b_enc))}
    os.environ["PIPELINE_NATIVE"] = "0"
    topk["torch_ms"] = median_ms(lambda: row_topk(with_bias, K))
    os.environ["PIPELINE_NATIVE"] = "1"
    topk["bias_broadcast_ms"] = bias_copy
    topk["speedup"] = (topk["torch_ms"] + bias_copy) / topk["kernel_ms"]
    return {"d_sae": d_sae, "encoder_mm_ms": mm,
            "topk_rows_with_bias": topk,
            "batch_topk": both(lambda: _per_batch(with_bias, K * BATCH)),
            "outer_sum": both(lambda: outer_sum(g, latents, rows, x, d_sae)),
            "entry_dots": both(lambda: entry_dots(x, w_dec, latents, offsets))}


def step_ab(d_sae: int, rounds: int) -> dict:
    """Median ms of the topk step with the kernels and without, one step of each in turn."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(BATCH, D_IN, generator=gen) for _ in range(4)]
    sae = build_sae(sae_config(arch="topk", d_in=D_IN, d_sae=d_sae, k=K),
                    generator=torch.Generator().manual_seed(0))
    step = TrainStep(sae, BATCH, D_IN, 1.0, 10**6, 2e-4)
    times: dict[str, list[float]] = {"1": [], "0": []}
    for r in range(rounds + 1):  # round 0 warms both up
        for flag in ("1", "0"):
            os.environ["PIPELINE_NATIVE"] = flag
            step.load(batches[(2 * r + int(flag)) % 4])
            t = time.perf_counter()
            step.run()
            if r:
                times[flag].append(time.perf_counter() - t)
    os.environ["PIPELINE_NATIVE"] = "1"
    ours, torch_path = (statistics.median(times[f]) * 1e3 for f in ("1", "0"))
    return {"kernels_ms": ours, "torch_ms": torch_path, "speedup": torch_path / ours}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=lambda v: [int(d) for d in v.split(",")],
                   default=[4608, 18432, 73728])
    p.add_argument("--rounds", type=int, default=8, help="timed steps of each kind")
    p.add_argument("--no-step", action="store_true", help="the kernels alone, not the step")
    args = p.parse_args()
    keep_freed_memory()
    if native.library() is None:
        sys.exit("the C kernels could not be built (see the warning above)")
    results = []
    for d_sae in args.shapes:
        print(f"d_sae {d_sae}", file=sys.stderr, flush=True)
        res = kernels(d_sae)
        if not args.no_step:
            res["topk_step"] = step_ab(d_sae, args.rounds)
        results.append(res)
    print(json.dumps({"d_in": D_IN, "batch": BATCH, "k": K, "threads": torch.get_num_threads(),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
