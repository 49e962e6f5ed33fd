"""Our CPU training step with glibc keeping freed memory (pipeline.train.memory, the default)
against glibc's own defaults (PIPELINE_KEEP_FREED_MEMORY=0), each in its own process, since the
setting is process-wide. Prints one JSON object: steps/s, page faults per step and resident
memory of each, and the ratio, per architecture and d_sae (d_in 576, batch 4096, k 32).

    python scripts/bench_allocator.py [--shapes 4608,18432] [--archs topk,relu] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def child(arch: str, d_sae: int, steps: int) -> dict:
    """Runs in the subprocess: warm-up, then the timed steps."""
    import resource
    import time

    import torch

    from pipeline.sae import build_sae, sae_config
    from pipeline.train.step import TrainStep

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4096, 576, generator=gen) for _ in range(4)]
    sae = build_sae(sae_config(arch=arch, d_in=576, d_sae=d_sae, k=32),
                    generator=torch.Generator().manual_seed(0))
    step = TrainStep(sae, 4096, 576, 1.0, 10**6, 2e-4)
    for i in range(3):
        step.load(batches[i % 4])
        step.run()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    for i in range(steps):
        step.load(batches[i % 4])
        step.run()
    dt = time.perf_counter() - t
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"steps_per_s": steps / dt,
            "page_faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                                     - faults) / steps,
            "resident_mib": rss / 2**20}


def run(arch: str, d_sae: int, steps: int, keep: bool) -> dict:
    env = {**os.environ, "PIPELINE_KEEP_FREED_MEMORY": "1" if keep else "0"}
    out = subprocess.run([sys.executable, __file__, "--child", arch, str(d_sae), str(steps)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=lambda v: [int(d) for d in v.split(",")],
                   default=[4608, 18432])
    p.add_argument("--archs", type=lambda v: v.split(","), default=["topk", "relu"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        arch, d_sae, steps = args.child
        print(json.dumps(child(arch, int(d_sae), int(steps))))
        return
    results = []
    for d_sae in args.shapes:
        for arch in args.archs:
            print(f"{arch} d_sae {d_sae}", file=sys.stderr, flush=True)
            # alternated, twice each, best of two each: the machine's drift hits both alike
            runs = {True: [], False: []}
            for keep in (True, False, True, False):
                runs[keep].append(run(arch, d_sae, args.steps, keep))
            kept, default = (max(runs[k], key=lambda r: r["steps_per_s"]) for k in (True, False))
            results.append({"arch": arch, "d_sae": d_sae, "kept": kept, "default": default,
                            "steps_per_s_runs": {"kept": [r["steps_per_s"] for r in runs[True]],
                                                 "default": [r["steps_per_s"]
                                                             for r in runs[False]]},
                            "speedup": kept["steps_per_s"] / default["steps_per_s"]})
    print(json.dumps({"d_in": 576, "batch": 4096, "k": 32, "results": results}, indent=1))


if __name__ == "__main__":
    main()
