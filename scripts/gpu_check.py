"""The GPU acceptance check (run through scripts/gpu_check.sh): one JSON object on stdout,
progress on stderr.

Sections, each bounded in time, each reporting an error in its own entry without stopping the
others (see SECTIONS and the sizes in GPU / DRY below):
  tests    the CUDA tests (pytest -k cuda over the files that have CUDA cases)
  graph    our training step with the CUDA graph vs eager from the same init on the same
           batches: the weights after N steps (equal within tolerance) and steps/s
  train    bench_train's shape section (relu, topk, batchtopk at d_in 4096, batch 4096, k 64,
           d_sae 32768 and 131072) against sparsify's Triton path when sparsify is importable
  extract  a Llama-3-8B-shaped random model truncated after layer 16, bfloat16: extraction
           tokens/s, MFU against a bfloat16 matmul peak measured in the same run, writer ratio
  loader   the pinned-memory loader's host-to-device GB/s against a bare pinned copy, and the
           read-time chunk check's cost on a first epoch from the page cache (bench_loader)
`--dry-run` runs the same code on tiny shapes on the CPU (tests skipped). The exit status is 0
when every section ran (missed targets are in the JSON), 1 when one crashed or timed out.

    python scripts/gpu_check.py [--dry-run] [--out FILE] [--sections graph,train]
                                [--timeout extract=300] [--budget 470] [--tf32 on|off]
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch
from gpu_check_extract import extract_section
from gpu_check_sections import (
    cuda_test_command,
    graph_section,
    loader_section,
    tests_section,
    train_section,
)
from timing import log

GPU = {
    "tests": {},
    "graph": dict(d_in=4096, d_sae=4096, batch=4096, check_steps=20, steps=100),
    "train": dict(d_in=4096, d_saes=[32768, 131072], batch=4096, k=64, steps=20),
    "extract": dict(model={"num_hidden_layers": 17}, context_length=1024, rows_per_chunk=16384,
                    chunks=12, batch_size=16, compute="bfloat16", storage="bfloat16",
                    peak_n=8192, peak_reps=50),
    "loader": dict(d_model=4096, chunks=8, rows_per_chunk=4096, context_length=1024,
                   batch=4096, warmup=8, batches=64, storage="bfloat16", verify_repeats=3),
}
"""Sizes on the GPU: the shapes the issue's targets are stated at."""

DRY = {
    "tests": {},
    "graph": dict(d_in=32, d_sae=64, batch=64, check_steps=6, steps=5),
    "train": dict(d_in=32, d_saes=[128, 256], batch=64, k=8, steps=2),
    "extract": dict(model={"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 224,
                           "num_attention_heads": 8, "num_key_value_heads": 2},
                    context_length=64, rows_per_chunk=256, chunks=2, batch_size=4,
                    compute="float32", storage="float32", peak_n=256, peak_reps=5),
    "loader": dict(d_model=64, chunks=4, rows_per_chunk=512, context_length=64, batch=256,
                   warmup=4, batches=16, storage="bfloat16", verify_repeats=1),
}
"""Sizes of --dry-run: the same code on the CPU in seconds."""

SECTIONS = {"tests": (tests_section, 150), "graph": (graph_section, 60),
            "train": (train_section, 150), "extract": (extract_section, 240),
            "loader": (loader_section, 90)}
"""name: (function(device, sizes) -> dict, its time limit in seconds)."""

TARGETS = {
    "cuda_tests_pass_rate": ("tests", ">=", 1.0),
    "graph_vs_eager": ("graph", ">=", 1.3),
    "graph_weights_rel_diff": ("graph", "<=", 1e-4),
    "dense_steps_per_s": ("train", ">=", 60.0),
    "topk_vs_sparsify": ("train", ">=", 1.2),
    "extraction_mfu": ("extract", ">=", 0.45),
    "writer_ratio": ("extract", ">=", 0.95),
    "verify_ratio": ("loader", ">=", 0.95),
}
"""name: (section that measures it, rule, bound). Sections return the values under "measured"."""


class SectionTimeout(BaseException):
    """A section ran past its limit; not an Exception, so no `except Exception` swallows it."""


def _alarm(signum, frame):
    raise SectionTimeout


def _call_with_alarm(fn, device: torch.device, sizes: dict, limit: float) -> dict:
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(limit, 1e-3))
    try:
        return fn(device, sizes)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def run_section(name: str, device: torch.device, sizes: dict, limit: float) -> dict:
    """Run one section under a time limit; an exception (or the limit) becomes its "error"."""
    log(f"== {name} (at most {limit:.0f} s)")
    start = time.perf_counter()
    try:
        result = _call_with_alarm(SECTIONS[name][0], device, sizes, limit)
    except SectionTimeout:
        result = {"error": f"timed out after {limit:g} s (--timeout {name}=SECONDS to change)"}
    except Exception as e:  # a failing section is reported; the others still run
        result = {"error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc().splitlines()[-12:]}
    result["seconds"] = round(time.perf_counter() - start, 2)
    if "error" in result:
        log(f"   {name} failed: {result['error']}")
    gc.collect()
    if device.type == "cuda":
        try:  # a CUDA error can poison the context: report it, let the next sections say more
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception as e:
            result.setdefault("error", f"after the section: {type(e).__name__}: {e}")
    return result


def judge(sections: dict) -> dict:
    """Each target as {value, target, rule, met}; value and met are null when not measured."""
    out = {}
    for name, (section, rule, bound) in TARGETS.items():
        result = sections.get(section, {})
        value = result.get("measured", {}).get(name)
        entry = {"value": value, "target": bound, "rule": rule,
                 "met": None if value is None else (value >= bound if rule == ">=" else value <= bound)}
        if value is None:
            entry["why_not_measured"] = result.get("error") or result.get("skipped") or \
                result.get("measured_note", {}).get(name, f"section {section} not run")
        out[name] = entry
    return out


def parse_timeouts(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in SECTIONS or not seconds:
            raise SystemExit(f"--timeout takes NAME=SECONDS with NAME one of {', '.join(SECTIONS)}; "
                             f"got {item!r}")
        out[name] = float(seconds)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument("--timeout", action="append", default=[], metavar="NAME=SECONDS",
                   help="a section's time limit (repeatable)")
    p.add_argument("--budget", type=float, default=470.0,
                   help="seconds for all sections together: each stops at its limit or at this")
    p.add_argument("--tf32", choices=("on", "off"), default="on",
                   help="TF32 float32 matmuls in the training sections (the targets assume on)")
    args = p.parse_args()
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}: expected some of {', '.join(SECTIONS)}")
    limits = {n: lim for n, (_, lim) in SECTIONS.items()} | parse_timeouts(args.timeout)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda:0")
    if args.dry_run:  # tiny shapes gain nothing from threads, and on a busy CPU they wait on each other
        torch.set_num_threads(1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # float32 matmul precision of the training sections; extraction runs in bfloat16 anyway
    torch.set_float32_matmul_precision("high" if args.tf32 == "on" else "highest")
    sizes = DRY if args.dry_run else GPU
    report: dict = {
        "dry_run": args.dry_run, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": _version("transformers"), "tf32": args.tf32 == "on",
        "budget_s": args.budget, "sizes": {n: sizes[n] for n in names},
    }
    if args.dry_run:
        report["note"] = ("dry run: tiny shapes on the CPU; the targets are stated for the GPU "
                          "shapes, so met/unmet here means nothing")
    start = time.perf_counter()
    sections: dict = {}
    for name in names:
        if args.dry_run and name == "tests":
            sections[name] = {"skipped": "--dry-run: the CUDA tests need a GPU (on CPU they skip)",
                              "command": " ".join(cuda_test_command()[2:])}
            continue
        left = args.budget - (time.perf_counter() - start)
        if left < 1:
            sections[name] = {"error": f"not run: the --budget of {args.budget:g} s was spent"}
            continue
        sections[name] = run_section(name, device, sizes[name], min(limits[name], left))
    report["sections"] = sections
    report["targets"] = judge(sections)
    measured = [t for t in report["targets"].values() if t["met"] is not None]
    report["targets_met"] = f"{sum(t['met'] for t in measured)} of {len(measured)} measured"
    report["errors"] = [n for n, s in sections.items() if "error" in s]
    report["seconds"] = round(time.perf_counter() - start, 2)
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 1 if report["errors"] else 0


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
