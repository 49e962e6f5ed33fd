"""Timers shared by the benchmarks and scripts/gpu_check.py: steps/s of a function, matmul
bounds and a matmul peak, each synchronising the device around the clock on CUDA."""

from __future__ import annotations

import sys
import time

import torch


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, steps: int, device: torch.device, warmup: int = 3) -> float:
    """Steps per second of fn() after a warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return steps / (time.perf_counter() - t)


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 20,
                dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a large n x n matmul in `dtype` on this device (float32: TF32 if allowed)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def time_matmuls(fns, reps: int, device: torch.device) -> float:
    """Seconds for one call of each fn in turn: the fastest of `reps` rounds after a warm-up
    one. A bound is what the matmuls can do, so the best round (a slow round on a shared
    2-core machine once put the bound at 0.6 of itself); our steps are timed as means."""
    best = float("inf")
    for r in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        for f in fns:
            f()
        sync(device)
        if r:
            best = min(best, time.perf_counter() - t)
    return best


def matmul_bounds(d_in: int, d_sae: int, batch: int, device: torch.device) -> dict:
    """Seconds of the five matmuls of a dense step (x W_enc, z W_dec; backward: dz = g W_dec^T,
    dW_dec = z^T g, dW_enc = x^T dpre) and of the encoder matmul alone, at these shapes, each
    written into a preallocated output: the arithmetic alone (a new [batch, d_sae] output
    would add its page faults, 1.2 GB of them at d_sae 73728, to the bound)."""
    x, g = torch.randn(batch, d_in, device=device), torch.randn(batch, d_in, device=device)
    w_enc = torch.randn(d_in, d_sae, device=device)
    w_dec = torch.randn(d_sae, d_in, device=device)
    z = torch.randn(batch, d_sae, device=device)
    wide, narrow = torch.empty_like(z), torch.empty_like(x)
    five = time_matmuls([lambda: torch.mm(x, w_enc, out=wide),
                         lambda: torch.mm(z, w_dec, out=narrow),
                         lambda: torch.mm(g, w_dec.t(), out=wide),
                         lambda: torch.mm(z.t(), g, out=w_dec),
                         lambda: torch.mm(x.t(), z, out=w_enc)], 2, device)
    encoder = time_matmuls([lambda: torch.mm(x, w_enc, out=wide)], 3, device)
    return {"five_matmuls_s": five, "encoder_matmul_s": encoder,
            "dense_bound_steps_per_s": 1 / five, "encoder_bound_steps_per_s": 1 / encoder}
