"""Does training on the masked stream change the SAE? Extract one cache (clean and masked streams),
train one SAE per architecture, stream (clean, masked, the 50/50 mix) and seed with the same
budget, evaluate every one on the same clean held-out chunk (absorption, FVE, CE increase, L0,
dead latents) and on that chunk's masked stream (the out-of-distribution gap), and write the
means with 95% intervals across seeds and the paired differences against clean training to
compare.md, compare.json and compare.png in --out.

    python scripts/compare_masking.py --out runs/compare [--tokens N] [--train-tokens N]
        [--archs topk,relu] [--k 32] [--l1 8] [--seeds 0,1,2] [--streams clean,masked,mix]

Rerunning resumes: the cache, every finished SAE and every finished evaluation are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from seed_stats import cell, paired, summarize

from cache_schema import open_cache
from pipeline import models
from pipeline.data import ActivationLoader
from pipeline.devices import resolve_device
from pipeline.eval.absorption import AbsorptionConfig
from pipeline.eval.config import EvalConfig
from pipeline.eval.letters import WordSample
from pipeline.eval.run import evaluate, finite_or_null, holdout_sequences
from pipeline.eval.splice import spliced_ce
from pipeline.extract.config import ExtractConfig
from pipeline.extract.run import extract
from pipeline.remote import local_cache
from pipeline.run import RunDir
from pipeline.sae.recon import reconstruction_metrics
from pipeline.train.config import TrainConfig
from pipeline.train.rundir import check_run_dir
from pipeline.train.trainer import train

METRICS = (("absorption", "absorption: mean absorption fraction"),
           ("full_absorption", "absorption: mean full absorption"),
           ("fve", "FVE (clean held-out)"), ("fve_masked", "FVE (masked held-out)"),
           ("ood_gap", "OOD gap: FVE clean - masked"), ("ce_increase", "CE increase (nats)"),
           ("l0", "L0"), ("dead_fraction", "dead latents (fraction)"))
TOPK_FAMILY = ("topk", "batchtopk")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--out", type=Path, default=Path("runs/compare"))
    add("--cache", default=None, help="an existing cache (default: extract OUT/cache)")
    add("--model", default="default")
    add("--corpus", default="default")
    add("--layer", type=int, default=6)
    add("--tokens", type=int, default=131072,
        help="cache size (ignored with --cache); the last chunk is held out")
    add("--train-tokens", type=int, default=131072, help="tokens per SAE (epochs over the cache)")
    add("--archs", default="topk,relu")
    add("--streams", default="clean,masked,mix")
    add("--seeds", default="0,1,2")
    add("--k", type=int, default=32, help="TopK: active latents per token")
    add("--l1", type=float, default=8.0, help="ReLU: sparsity coefficient")
    add("--expansion", type=int, default=4)
    add("--batch-size", type=int, default=512)
    add("--lr", type=float, default=2e-3)
    add("--ce-sequences", type=int, default=8)
    add("--absorption-every", type=int, default=16)
    args = p.parse_args(argv)
    args.archs, args.streams = args.archs.split(","), args.streams.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def run_name(arch: str, stream: str, seed: int) -> str:
    return f"{arch}_{stream}_s{seed}"


def train_config(args, cache: str, arch: str, stream: str, seed: int) -> TrainConfig:
    sparsity = {"k": args.k} if arch in TOPK_FAMILY else {"l1": args.l1}
    return TrainConfig.from_flat(
        cache=cache, out=str(args.out / run_name(arch, stream, seed)), layer=args.layer,
        stream=stream, arch=arch, seed=seed, expansion=args.expansion,
        batch_size=args.batch_size, tokens=args.train_tokens, lr=args.lr, log_every=16,
        checkpoint_every=128, holdout_chunks=1, progress=False, **sparsity)


def train_all(cfgs: dict[str, TrainConfig], cache: str) -> dict[str, float]:
    """Train the runs not finished yet (resuming interrupted ones); seconds per run trained."""
    manifest = open_cache(local_cache(cache))
    seconds = {}
    for name, cfg in cfgs.items():
        run = RunDir(cfg.out)
        cfg.resume = run.config.is_file()
        if run.summary.is_file():
            check_run_dir(cfg, manifest)  # a finished run with other settings is refused
            continue
        log(f"train {name}{' (resumed)' if cfg.resume else ''}")
        start = time.perf_counter()
        train(cfg)
        seconds[name] = time.perf_counter() - start
        log(f"trained {name} in {seconds[name]:.0f} s")
    return seconds


class Shared:
    """What every SAE's evaluation shares, made on first use: the model with the clean and
    zero-ablation CE of the held-out sequences (only the SAE's forward runs per SAE), and one
    absorption word sample (the prompts go through the model once)."""

    def __init__(self, args, cache: str):
        self.args, self.cache, self.device = args, cache, resolve_device("auto")
        self.manifest = open_cache(local_cache(cache))
        self.model = None if args.model == "default" else args.model
        self.src = models.model_source_of(self.manifest, self.model)
        self.lm = self.tokens = self.baseline = self.sample = None
        self.seconds = {"ce": 0.0, "absorption": 0.0}

    def ce(self, sae, chunks: list[int]) -> dict:
        start = time.perf_counter()
        if self.lm is None:
            self.lm = models.load_model_of(self.manifest, self.model, self.device)
            self.tokens = holdout_sequences(str(local_cache(self.cache)), self.manifest, chunks,
                                            self.args.ce_sequences)
        result = spliced_ce(self.lm, self.args.layer, sae.to(self.device), self.tokens,
                            self.manifest.special_token_ids, baseline=self.baseline)
        self.baseline = self.baseline or result
        self.seconds["ce"] += time.perf_counter() - start
        return result

    def absorption(self, sae) -> dict:
        start = time.perf_counter()
        if self.sample is None:
            log("absorption: the word sample's prompts through the model")
            base = models.load_truncated(self.src, self.args.layer + 1, torch.float32
                                         if self.device == "cpu" else torch.bfloat16, self.device)
            self.sample = WordSample(models.load_tokenizer(self.src), base, self.args.layer,
                                     AbsorptionConfig(every=self.args.absorption_every))
            (self.args.out / "absorption_words.json").write_text(
                json.dumps(self.sample.record()))
        result = self.sample.score(sae.cpu())
        self.seconds["absorption"] += time.perf_counter() - start
        return result


def evaluate_run(args, cfg: TrainConfig, shared: Shared) -> dict:
    """The run's values, kept in OUT/values/NAME.json and reused while the SAE and the settings
    of the evaluation are the same. The run folder's eval.json is the clean evaluation, CE
    included."""
    run = RunDir(cfg.out)
    kept = args.out / "values" / f"{run.path.name}.json"
    key = {"ce_sequences": args.ce_sequences, "absorption_every": args.absorption_every,
           "trained": run.summary.stat().st_mtime_ns}
    if kept.is_file() and json.loads(kept.read_text())["key"] == key:
        return json.loads(kept.read_text())["values"]
    log(f"evaluate {run.path.name}")
    start = time.perf_counter()
    clean = evaluate(EvalConfig(run.path, ce_sequences=0, stream="clean", progress=False))
    sae = run.load_sae()
    with ActivationLoader(shared.cache, args.layer, stream="masked", holdout_chunks=1,
                          device=shared.device) as loader:
        masked, _ = reconstruction_metrics(sae.to(shared.device), loader.holdout())
    if args.ce_sequences:
        clean.update(shared.ce(sae, clean["holdout_chunks"]))
        run.eval_json.write_text(json.dumps(finite_or_null(clean), indent=1, allow_nan=False))
    result = shared.absorption(sae)
    values = {"fve": clean["fve"], "fve_masked": masked["fve"],
              "ood_gap": clean["fve"] - masked["fve"], "ce_increase": clean.get("ce_increase"),
              "l0": clean["l0"], "dead_fraction": clean["dead_fraction"],
              "absorption": result["mean_absorption_fraction"],
              "full_absorption": result["mean_full_absorption"],
              "absorption_note": result["too_few_letters"],
              "heldout_tokens": clean["tokens"], "absorption_words": result["n_words"],
              "eval_seconds": time.perf_counter() - start}
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({"key": key, "values": values, "absorption": result}))
    return values


def aggregate(args, values: dict[str, dict]) -> tuple[dict, dict]:
    """Per arch and stream, every metric's summary across seeds; per arch and stream other than
    clean, the paired difference stream - clean of every metric (paired by seed)."""
    def by_seed(arch, stream, metric):
        return {s: values[run_name(arch, stream, s)][metric] for s in args.seeds}

    groups = {f"{a} {s}": {m: summarize(list(by_seed(a, s, m).values())) for m, _ in METRICS}
              for a in args.archs for s in args.streams}
    others = [s for s in args.streams if s != "clean"] if "clean" in args.streams else []
    diffs = {f"{a} {s} - clean": {m: paired(by_seed(a, "clean", m), by_seed(a, s, m))
                                  for m, _ in METRICS}
             for a in args.archs for s in others}
    return groups, diffs


def markdown(args, groups: dict, diffs: dict, values: dict) -> str:
    one = next(iter(values.values()))
    lines = [f"Mean ± 95% half-width across seeds {args.seeds} (Student t); layer {args.layer}, "
             f"{args.tokens} cache tokens, {args.train_tokens} training tokens per SAE, "
             f"expansion {args.expansion}, TopK k {args.k}, ReLU l1 {args.l1}; evaluated on "
             f"{one['heldout_tokens']} held-out tokens, CE on {args.ce_sequences} sequences, "
             f"absorption on {one['absorption_words']} words.", "",
             "| metric | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for metric, label in METRICS:
        lines.append(f"| {label} | " + " | ".join(cell(g[metric]) for g in groups.values())
                     + " |")
    notes = sorted({v["absorption_note"] for v in values.values() if v["absorption_note"]})
    lines += [f"\nAbsorption: {n}." for n in notes]
    if diffs:
        lines += ["", "Paired difference (same seed) against clean training, mean ± 95% "
                  "half-width; whether the interval excludes 0:", "",
                  "| metric | " + " | ".join(diffs) + " |", "|---" * (len(diffs) + 1) + "|"]
        for metric, label in METRICS:
            lines.append(f"| {label} | " + " | ".join(
                cell(d[metric], 2) + {True: ", excludes 0", False: ", includes 0",
                                      None: ""}[d[metric]["excludes_zero"]]
                for d in diffs.values()) + " |")
    return "\n".join(lines)


def plot(args, groups: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, (len(METRICS) + 1) // 2, figsize=(3.2 * len(METRICS) / 2, 6),
                             constrained_layout=True, squeeze=False)
    width = 0.8 / len(args.streams)
    for ax, (metric, label) in zip(axes.flat, METRICS, strict=False):
        for j, stream in enumerate(args.streams):
            cells = [groups[f"{a} {stream}"][metric] for a in args.archs]
            nan = float("nan")  # draws nothing: no bar where there is no result
            ax.bar([i + j * width for i in range(len(args.archs))],
                   [nan if c["mean"] is None else c["mean"] for c in cells], width,
                   label=stream, capsize=3,
                   yerr=[nan if c["half_width"] is None else c["half_width"] for c in cells])
        ax.set_xticks([i + width * (len(args.streams) - 1) / 2 for i in range(len(args.archs))],
                      args.archs)
        ax.set_title(label, fontsize=8)
        if all(groups[g][metric]["mean"] is None for g in groups):
            ax.text(0.5, 0.5, "no result", ha="center", transform=ax.transAxes)
    axes.flat[0].legend(fontsize=7, title="trained on", title_fontsize=7)
    for ax in list(axes.flat)[len(METRICS):]:
        ax.axis("off")
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    begin = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or str(args.out / "cache")
    times: dict = {}
    if args.cache is None:
        log(f"extract {cache}")
        start = time.perf_counter()
        extract(ExtractConfig(out=cache, model=args.model, corpus=args.corpus,
                              layers=[args.layer], tokens=args.tokens, rows_per_chunk=4096,
                              context_length=128))
        times["extract"] = time.perf_counter() - start
    m = open_cache(local_cache(cache))
    args.tokens = m.n_chunks * m.rows_per_chunk
    cfgs = {run_name(a, s, seed): train_config(args, cache, a, s, seed)
            for a in args.archs for s in args.streams for seed in args.seeds}
    times["train"] = train_all(cfgs, cache)
    times["train_total"] = sum(times["train"].values())
    shared = Shared(args, cache)
    values = {name: evaluate_run(args, cfg, shared) for name, cfg in cfgs.items()}
    times.update(shared.seconds)
    groups, diffs = aggregate(args, values)
    md = markdown(args, groups, diffs, values)
    times["total"] = time.perf_counter() - begin
    log("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items() if k != "train"))
    (args.out / "compare.md").write_text(md + "\n")
    (args.out / "compare.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "values": values, "groups": groups, "paired": diffs, "seconds": times}, indent=1))
    plot(args, groups, args.out / "compare.png")
    print(md)


if __name__ == "__main__":
    main()
