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
      fraction of the matmul peak measured in the same run, with TF32 on (`pipeline train
      --tf32`) and off (its default).

    python scripts/bench_train.py [--cache DIR] [--batch-size 1024] [--expansion 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from timing import log, matmul_bounds, matmul_peak, time_steps  # scripts/timing.py
from torch import nn

from cache_schema.synthetic import write_synthetic_cache
from pipeline.data import ActivationLoader
from pipeline.sae import build_sae, sae_config
from pipeline.train.memory import keep_freed_memory
from pipeline.train.step import TrainStep


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


BASELINES = ("saelens_standard", "saelens_topk", "sparsify_topk")


def shape_section(d_sae: int, steps: int, device: torch.device, graph: bool,
                  dense_up_to: int, d_in: int = 576, batch: int = 4096, k: int = 32,
                  baselines: tuple[str, ...] = BASELINES) -> dict:
    log(f"(d) d_in {d_in}, d_sae {d_sae}, batch {batch}, k {k}")
    gen = torch.Generator().manual_seed(0)
    # on the device already: a host batch would add its copy to every step timed
    batches = [torch.randn(batch, d_in, generator=gen).to(device) for _ in range(4)]
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

        # a graphed step runs 3 eager steps, then is captured on the 4th: time replays only
        out[f"ours_{name}_steps_per_s"] = time_steps(one, steps, device, warmup=5 if graph else 2)
        del sae, step, one
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out.update(baseline_runs(batches, d_sae, k, steps, device, baselines))
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


def baseline_runs(batches: list[torch.Tensor], d_sae: int, k: int, steps: int,
                  device: torch.device = torch.device("cpu"),
                  names: tuple[str, ...] = BASELINES) -> dict:
    """SAELens and sparsify on the same batches, each skipped (with the reason) if missing or
    failing. On CUDA sparsify takes its Triton decoder; SAELens is timed on CPU only."""
    try:
        import baselines  # scripts/baselines.py; the libraries themselves are imported on use
    except ImportError as e:
        return {"baselines": f"skipped: {e}"}
    cuda = device.type == "cuda"
    runs = {"saelens_standard": lambda: baselines.saelens_steps_per_s(batches, d_sae, "standard",
                                                                      k, steps),
            "saelens_topk": lambda: baselines.saelens_steps_per_s(batches, d_sae, "topk", k,
                                                                  steps),
            "sparsify_topk": lambda: baselines.sparsify_steps_per_s(batches, d_sae, k, steps,
                                                                    device=device, triton=cuda)}
    out: dict = {}
    for name in names:
        if name.startswith("saelens") and device.type != "cpu":
            out[name] = "skipped: scripts/baselines.py times SAELens on CPU only"
            continue
        log(f"  {name}")
        try:
            out[f"{name}_steps_per_s"] = runs[name]()
        except ImportError as e:
            out[name] = f"skipped: {e} (pip install -e .[compare])"
            continue
        except Exception as e:  # a baseline that breaks (a Triton build, say) leaves ours standing
            out[name] = f"failed: {type(e).__name__}: {e}"
            continue
        if cuda and name.startswith("sparsify"):
            out["sparsify_decoder"] = baselines.sparsify_decoder()
    return out


def gpu_section(steps: int, tf32: bool = True) -> dict:
    """CUDA graph vs eager with TF32 on (`pipeline train --tf32`) or off (its default)."""
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    d_in, d_sae, batch = 4096, 32768, 4096
    out = {"shape": {"d_in": d_in, "d_sae": d_sae, "batch": batch}, "tf32": tf32}
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
        result["gpu"] = {"tf32_on": gpu_section(max(args.steps, 20), True),  # pipeline train --tf32
                         "tf32_off": gpu_section(max(args.steps, 20), False)}  # its default
    else:
        result["gpu"] = "skipped: no CUDA on this machine"
    print(json.dumps(result, indent=1))


def _first_layer(cache: Path) -> int:
    from cache_schema import open_cache

    return open_cache(cache).layers[0]


if __name__ == "__main__":
    main()
