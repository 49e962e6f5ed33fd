"""Sections of scripts/gpu_check.py other than extraction: the CUDA tests, CUDA graph vs eager,
training throughput, and the loader's host-to-device rate and the cost of its read-time checks.
Each takes (device, sizes) and returns a dict whose "measured" entry holds the values
gpu_check.py judges against its targets."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_loader import chunk_files, measure, summarise
from bench_train import our_step, shape_section
from timing import log, sync, time_steps

from cache_schema.synthetic import write_synthetic_cache
from pipeline.data import ActivationLoader

ROOT = Path(__file__).resolve().parent.parent


def free(device: torch.device) -> None:
    """Give cached blocks back between runs, so that one run's pool does not crowd the next."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def cuda_test_command() -> list[str]:
    """pytest -k cuda over the test files that use torch.cuda, found when run so that new CUDA
    tests are picked up (not this check's own test, which runs this script); no -x, so every
    failure is counted."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "torch.cuda" in p.read_text() and p.name != "test_gpu_check.py")
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "-k", "cuda",
            *files]


def tests_section(device: torch.device, sizes: dict) -> dict:
    """The CUDA tests in a child process: counts of passed, failed, errors and skipped."""
    cmd = cuda_test_command()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    counts = {word.rstrip("s") if word.startswith("error") else word: int(n) for n, word in
              re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    out = {"command": " ".join(cmd[2:]), "exit_code": r.returncode, "summary": summary,
           **{k: counts.get(k, 0) for k in ("passed", "failed", "error", "skipped", "deselected")}}
    if r.returncode != 0:
        out["output_tail"] = (r.stdout + r.stderr)[-4000:].splitlines()
    ran = out["passed"] + out["failed"] + out["error"]
    if ran == 0:  # all skipped or none collected: pytest did not see the GPU
        raise RuntimeError(f"no CUDA test ran (exit {r.returncode}): {summary or r.stderr[-500:]}")
    out["measured"] = {"cuda_tests_pass_rate": out["passed"] / ran}
    return out


def graph_section(device: torch.device, sizes: dict) -> dict:
    """The masked SAE's step with and without the CUDA graph, from the same init on the same
    batches: weights after `check_steps` steps (refresh between steps, as the trainer does),
    then steps/s over `steps` more. On the CPU both runs are eager (no graphs there)."""
    d_in, d_sae, batch = sizes["d_in"], sizes["d_sae"], sizes["batch"]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(batch, d_in, generator=gen).to(device) for _ in range(4)]
    modes = {"eager": False, "graph": device.type == "cuda"}
    weights, rates = {}, {}
    for name, use_graph in modes.items():
        log(f"   {name}: d_in {d_in}, d_sae {d_sae}, batch {batch}")
        step = our_step(d_in, d_sae, batch, device, use_graph)
        for s in range(sizes["check_steps"]):
            step.load(batches[s % len(batches)])
            step.run()
            step.sae.refresh(s + 1)
        sync(device)
        if use_graph and step.graph is None:
            raise RuntimeError(f"no CUDA graph was captured in {sizes['check_steps']} steps")
        weights[name] = {k: v.detach().clone() for k, v in step.sae.state_dict().items()}
        it = itertools.count()

        def one(step=step, it=it):
            step.load(batches[next(it) % len(batches)])
            step.run()

        rates[name] = time_steps(one, sizes["steps"], device, warmup=2)
        del step, one
        free(device)
    worst, rel, max_abs = None, 0.0, 0.0
    for k, want in weights["eager"].items():
        got, want = weights["graph"][k].double(), want.double()
        diff = (got - want).abs().max().item() if want.numel() else 0.0
        r = diff / max(want.abs().max().item(), 1e-12) if want.numel() else 0.0
        max_abs = max(max_abs, diff)
        if worst is None or r > rel:
            worst, rel = k, r
    return {"graph_captured": modes["graph"], "shape": {"d_in": d_in, "d_sae": d_sae,
                                                        "batch": batch},
            "eager_steps_per_s": rates["eager"], "graph_steps_per_s": rates["graph"],
            "max_abs_diff": max_abs, "worst_tensor": worst,
            "measured": {"graph_vs_eager": rates["graph"] / rates["eager"],
                         "graph_weights_rel_diff": rel}}


def train_section(device: torch.device, sizes: dict) -> dict:
    """bench_train's shape section at each d_sae, with sparsify as the only baseline. A shape
    that fails (out of memory at the larger d_sae, say) is reported beside the others."""
    graph = device.type == "cuda"
    shapes = []
    for d_sae in sizes["d_saes"]:
        try:
            shapes.append(shape_section(d_sae, sizes["steps"], device, graph, dense_up_to=0,
                                        d_in=sizes["d_in"], batch=sizes["batch"], k=sizes["k"],
                                        baselines=("sparsify_topk",)))
        except Exception as e:
            shapes.append({"d_sae": d_sae, "error": f"{type(e).__name__}: {e}"})
        free(device)
    out: dict = {"graph": graph, "shapes": shapes, "measured": {}}
    failed = [s for s in shapes if "error" in s]
    if failed:
        out["error"] = "; ".join(f"d_sae {s['d_sae']}: {s['error']}" for s in failed)
    if "ours_relu_steps_per_s" in shapes[0]:
        out["measured"]["dense_steps_per_s"] = shapes[0]["ours_relu_steps_per_s"]
    ratios = [s.get("topk_sparse_vs_sparsify") for s in shapes]
    if all(r is not None for r in ratios):
        out["measured"]["topk_vs_sparsify"] = min(ratios)  # every shape must reach it
    elif not failed:
        out["measured_note"] = {"topk_vs_sparsify": "sparsify absent or failing: "
                                + str(shapes[0].get("sparsify_topk", "not run"))}
    return out


def loader_section(device: torch.device, sizes: dict) -> dict:
    """ActivationLoader over a synthetic cache onto `device` (pinned staging on CUDA): GB/s of
    stored bytes delivered, after a warm-up epoch (its first reads also hash the chunk files),
    against a bare copy of the same bytes from (pinned) host memory. Then the read-time check's
    cost on this machine's cores: bench_loader's first epoch from the page cache, checked
    against not checked ("verify_ratio", medians of `verify_repeats`)."""
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_loader_"))
    try:
        d, B = sizes["d_model"], sizes["batch"]
        log(f"   synthetic cache: {sizes['chunks']} chunks of {sizes['rows_per_chunk']} rows, "
            f"d_model {d}, {sizes['storage']}")
        write_synthetic_cache(tmp / "cache", n_chunks=sizes["chunks"],
                              rows_per_chunk=sizes["rows_per_chunk"], d_model=d,
                              context_length=sizes["context_length"],
                              storage_dtype=sizes["storage"], seed=0, index_column=False)
        with ActivationLoader(tmp / "cache", layer=0, batch_size=B, device=device,
                              seed=0) as loader:
            for _ in range(sizes["warmup"]):
                next(loader)
            sync(device)
            t = time.perf_counter()
            for _ in range(sizes["batches"]):
                x = next(loader)
            sync(device)
            seconds = time.perf_counter() - t
            pinned, on = loader.pin, str(x.device)
        runs = [measure(chunk_files(tmp / "cache"), tmp / "cache", B, False,
                        [("ours", False, True), ("ours_unverified", False, False)])
                for _ in range(sizes["verify_repeats"])]
        verify = summarise(runs)
        stored = torch.empty(0, dtype=getattr(torch, sizes["storage"])).element_size()
        batch_bytes = B * d * stored
        loader_gbps = sizes["batches"] * batch_bytes / seconds / 1e9
        copy_gbps = _copy_gbps(device, (B, d), getattr(torch, sizes["storage"]), pinned,
                               sizes["batches"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"pinned": pinned, "batches_on": on, "batch_bytes": batch_bytes,
            "batches_per_s": sizes["batches"] / seconds, "loader_gbps": loader_gbps,
            "bare_copy_gbps": copy_gbps, "loader_vs_bare_copy": loader_gbps / copy_gbps,
            "first_epoch_warm": {k: verify[k] for k in ("ours", "ours_unverified",
                                                        "verify_ratios")},
            "measured": {"verify_ratio": verify["verify_ratio"]}}


def _copy_gbps(device: torch.device, shape: tuple, dtype: torch.dtype, pinned: bool,
               reps: int) -> float:
    """GB/s of copying one batch of stored values from host memory to `device`."""
    host = torch.randn(shape).to(dtype)
    host = host.pin_memory() if pinned else host
    dev = torch.empty(shape, dtype=dtype, device=device)
    dev.copy_(host, non_blocking=True)
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        dev.copy_(host, non_blocking=True)
    sync(device)
    return reps * host.numel() * host.element_size() / (time.perf_counter() - t) / 1e9
