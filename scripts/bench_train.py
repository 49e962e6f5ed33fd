"""Benchmark the training step. Prints one JSON object on stdout (progress on stderr).

In one run, on the same cache:
  (a) our step fed by the real loader vs the same step on a batch already in memory
      (target >= 0.9: the loader is never the bottleneck);
  (b) our step vs a straightforward eager loop in the style of the source article (its MaskedSAE,
      a torch DataLoader over the same rows, loss.item() every step);
  (d) at d_in 576, batch 4096, k 32 and each --shapes d_sae (default 4608, 18432, 73728), on the
      same in-memory batches: the matmul bounds measured in this run (the five matmuls of a dense
      step; the encoder's forward matmul alone), our relu step, our topk step (k-sparse, and dense
      up to --dense-up-to), our batchtopk step (k-sparse), and, when installed
      (`pip install -e .[compare]`), SAELens's SAETrainer.fit (standard, topk) and sparsify's
      SparseCoder step (scripts/baselines.py);
  (c) on CUDA only: CUDA graph vs eager at d_in 4096, d_sae 32768, batch 4096, steps/s, and the
      fraction of the matmul peak measured in the same run.

    python scripts/bench_train.py [--cache DIR] [--batch-size 1024] [--expansion 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from cache_schema.synthetic import write_synthetic_cache
from pipeline.data import ActivationLoader
from pipeline.sae import build_sae, sae_config
from pipeline.train.memory import keep_freed_memory
from pipeline.train.step import TrainStep


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


def our_step(d_in: int, d_sae: int, batch: int, device: torch.device, graph: bool,
             arch: str = "masked") -> TrainStep:
    sae = build_sae(sae_config(arch=arch, d_in=d_in, d_sae=d_sae),
                    generator=torch.Generator().manual_seed(0)).to(device)
    return TrainStep(sae, batch, d_in, 1.0, total_steps=10**6, lr=2e-4, lr_warmup_steps=10,
                     use_graph=graph)


class ArticleMaskedSAE(nn.Module):
    """The source article's MaskedSAE and loss. As published its hook reads output[0] (x_hat),
    which crashes whenever d_sae != d_model; here it reads z so that the baseline runs."""

    def __init__(self, d_model: int, d_sae: int):
        super().__init__()
        self.W_enc = nn.Parameter(torch.empty(d_model, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_model))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        nn.init.kaiming_uniform_(self.W_enc)
        nn.init.kaiming_uniform_(self.W_dec)
        self.register_buffer("absorption_mask", torch.zeros(d_sae))
        self.register_buffer("running_mean_activation", torch.ones(d_sae))
        self.register_forward_hook(self._stats)

    def _stats(self, module, inputs, output):
        z = output[1]
        self.running_mean_activation = 0.99 * self.running_mean_activation + \
            0.01 * z.abs().mean(dim=0).detach()

    def forward(self, x):
        z = torch.relu(x @ self.W_enc + self.b_enc)
        return z @ self.W_dec + self.b_dec, z

    def compute_loss(self, x, x_hat, z):
        dec = self.W_dec.norm(dim=1)
        return ((x - x_hat) ** 2).mean() + 1e-3 * z.abs().mean() + \
            5e-4 * (self.absorption_mask * dec).mean()


def article_loop(rows: torch.Tensor, d_sae: int, batch: int, steps: int,
                 device: torch.device) -> float:
    """Steps/s of the article's training loop over a shuffling DataLoader of the same rows."""
    model = ArticleMaskedSAE(rows.shape[1], d_sae).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    data = torch.utils.data.DataLoader(rows, batch_size=batch, shuffle=True, drop_last=True,
                                       pin_memory=device.type == "cuda")
    it = iter(data)

    def one():
        nonlocal it
        try:
            b = next(it)
        except StopIteration:
            it = iter(data)
            b = next(it)
        x = b.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        x_hat, z = model(x)
        loss = model.compute_loss(x, x_hat, z)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        opt.step()
        with torch.no_grad():
            model.W_dec.data = nn.functional.normalize(model.W_dec.data, dim=1)
        loss.item()

    return time_steps(one, steps, device)


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """FLOP/s of a large float32 matmul (TF32 allowed as in training) on this device."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
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


def shape_section(d_sae: int, steps: int, device: torch.device, graph: bool,
                  dense_up_to: int, d_in: int = 576, batch: int = 4096, k: int = 32) -> dict:
    log(f"(d) d_in {d_in}, d_sae {d_sae}, batch {batch}, k {k}")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, d_in, generator=gen) for _ in range(4)]
    out: dict = {"d_sae": d_sae, **matmul_bounds(d_in, d_sae, batch, device)}
    runs = [("relu", "relu", True), ("topk_sparse", "topk", True),
            ("batchtopk_sparse", "batchtopk", True)]
    if d_sae <= dense_up_to:
        runs.append(("topk_dense", "topk", False))
    for name, arch, sparse in runs:
        log(f"  ours {name}")
        sae = build_sae(sae_config(arch=arch, d_in=d_in, d_sae=d_sae, k=k, sparse=sparse),
                        generator=torch.Generator().manual_seed(0)).to(device)
        step = TrainStep(sae, batch, d_in, 1.0, 10**6, 2e-4, use_graph=graph)
        it = iter(range(10**9))

        def one(step=step, it=it):
            step.load(batches[next(it) % len(batches)])
            step.run()

        out[f"ours_{name}_steps_per_s"] = time_steps(one, steps, device, warmup=2)
        del sae, step
    out.update(baseline_runs(batches, d_sae, k, steps))
    ours = out["ours_topk_sparse_steps_per_s"]
    out["topk_sparse_vs_encoder_bound"] = ours / out["encoder_bound_steps_per_s"]
    out["relu_vs_dense_bound"] = out["ours_relu_steps_per_s"] / out["dense_bound_steps_per_s"]
    if d_sae <= dense_up_to:
        out["topk_sparse_vs_dense"] = ours / out["ours_topk_dense_steps_per_s"]
    if "sparsify_topk_steps_per_s" in out:
        out["topk_sparse_vs_sparsify"] = ours / out["sparsify_topk_steps_per_s"]
    if "saelens_standard_steps_per_s" in out:
        out["relu_vs_saelens_standard"] = out["ours_relu_steps_per_s"] / \
            out["saelens_standard_steps_per_s"]
        out["topk_sparse_vs_saelens_topk"] = ours / out["saelens_topk_steps_per_s"]
    return out


def baseline_runs(batches: list[torch.Tensor], d_sae: int, k: int, steps: int) -> dict:
    """SAELens and sparsify on the same batches, each skipped (with the reason) if missing."""
    try:
        import baselines  # scripts/baselines.py; the libraries themselves are imported on use
    except ImportError as e:
        return {"baselines": f"skipped: {e}"}
    runs = {"saelens_standard": lambda: baselines.saelens_steps_per_s(batches, d_sae, "standard",
                                                                      k, steps),
            "saelens_topk": lambda: baselines.saelens_steps_per_s(batches, d_sae, "topk", k,
                                                                  steps),
            "sparsify_topk": lambda: baselines.sparsify_steps_per_s(batches, d_sae, k, steps)}
    out: dict = {}
    for name, run in runs.items():
        log(f"  {name}")
        try:
            out[f"{name}_steps_per_s"] = run()
        except ImportError as e:
            out[name] = f"skipped: {e} (pip install -e .[compare])"
    return out


def gpu_section(steps: int) -> dict:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    d_in, d_sae, batch = 4096, 32768, 4096
    out = {"shape": {"d_in": d_in, "d_sae": d_sae, "batch": batch}}
    x = torch.randn(batch, d_in, device=device)
    for graph in (False, True):
        step = our_step(d_in, d_sae, batch, device, graph)
        step.load(x)
        out["graph_steps_per_s" if graph else "eager_steps_per_s"] = time_steps(
            step.run, steps, device, warmup=5)
        del step
        torch.cuda.empty_cache()
    out["graph_vs_eager"] = out["graph_steps_per_s"] / out["eager_steps_per_s"]
    step_flop = 12 * batch * d_in * d_sae  # fwd 2 matmuls + bwd 4 matmuls, 2 FLOP per MAC
    peak = matmul_peak(device)
    out["matmul_peak_tflops"] = peak / 1e12
    out["graph_tflops"] = step_flop * out["graph_steps_per_s"] / 1e12
    out["fraction_of_matmul_peak"] = out["graph_tflops"] * 1e12 / peak
    out["article_a100_steps_per_s"] = 4.8
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=lambda v: [int(d) for d in v.split(",")],
                   default=[4608, 18432, 73728], help="d_sae values of section (d)")
    p.add_argument("--shape-steps", type=int, default=3, help="timed steps per run in (d)")
    p.add_argument("--dense-up-to", type=int, default=18432,
                   help="(d): the dense topk reference only up to this d_sae (it is slow)")
    args = p.parse_args()
    device = torch.device(args.device)
    # What TrainStep does on CPU, done first so that the matmul bounds, our steps and the
    # baselines all run on the same allocator settings (pipeline.train.memory).
    kept = keep_freed_memory()
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
    cache = args.cache
    if cache is None:
        cache = Path(tmp.name) / "cache"
        log(f"writing a synthetic cache (d_model 576) to {cache}")
        write_synthetic_cache(cache, n_chunks=16, rows_per_chunk=8192, d_model=576,
                              context_length=128, seed=0, index_column=False)
    graph = device.type == "cuda"
    result: dict = {"device": str(device), "torch_threads": torch.get_num_threads(),
                    "glibc_keeps_freed_memory": kept,
                    "batch_size": args.batch_size, "steps": args.steps}
    with ActivationLoader(cache, layer=_first_layer(cache),
                          batch_size=args.batch_size, device=device, seed=0) as loader:
        d_in = loader.d_model
        d_sae = args.expansion * d_in
        result.update(d_in=d_in, d_sae=d_sae)

        log("(a) our step: real loader vs a batch in memory")
        step = our_step(d_in, d_sae, args.batch_size, device, graph)
        fixed = next(loader).clone()

        def in_memory():
            step.load(fixed)
            step.run()

        def with_loader():
            step.load(next(loader))
            step.run()

        result["in_memory_steps_per_s"] = time_steps(in_memory, args.steps, device)
        result["loader_steps_per_s"] = time_steps(with_loader, args.steps, device)
        result["loader_vs_in_memory"] = result["loader_steps_per_s"] / \
            result["in_memory_steps_per_s"]

        log("(b) the article's eager loop on the same rows")
        rows = torch.cat([next(loader).cpu() for _ in range(8)])
    result["article_loop_steps_per_s"] = article_loop(rows, d_sae, args.batch_size, args.steps,
                                                      device)
    result["ours_vs_article_loop"] = result["loader_steps_per_s"] / \
        result["article_loop_steps_per_s"]
    flop = 12 * args.batch_size * d_in * d_sae
    result["our_gflops"] = flop * result["loader_steps_per_s"] / 1e9
    result["shapes"] = [shape_section(d_sae, args.shape_steps, device, graph, args.dense_up_to)
                        for d_sae in args.shapes]
    if torch.cuda.is_available():
        log("(c) CUDA graph vs eager at d_in 4096, d_sae 32768, batch 4096")
        result["gpu"] = gpu_section(max(args.steps, 20))
    else:
        result["gpu"] = "skipped: no CUDA on this machine"
    print(json.dumps(result, indent=1))


def _first_layer(cache: Path) -> int:
    from cache_schema import open_cache

    return open_cache(cache).layers[0]


if __name__ == "__main__":
    main()
