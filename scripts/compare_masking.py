"""Does training on the masked stream change the SAE? Extract once, train the same SAE on the clean
and on the masked stream with the same budget, evaluate both on clean held-out chunks, and write a
side-by-side table (compare.md), compare.json and compare.png into --out.

    python scripts/compare_masking.py [--out runs/compare] [--tokens 32768] [--layer 6]
        [--arch masked] [--train-tokens 262144] [--absorption-every 16]

Defaults run on the embedded default model in about 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.eval.config import EvalConfig
from pipeline.eval.run import evaluate
from pipeline.extract.config import ExtractConfig
from pipeline.extract.run import extract
from pipeline.run import RunDir
from pipeline.train.config import TrainConfig
from pipeline.train.trainer import train

ROWS = [("absorption: mean absorption fraction", ("absorption", "mean_absorption_fraction")),
        ("absorption: mean full absorption", ("absorption", "mean_full_absorption")),
        ("fraction of variance explained", ("fve",)), ("L0", ("l0",)),
        ("dead latents", ("dead_fraction",)), ("CE increase (nats)", ("ce_increase",)),
        ("loss recovered", ("loss_recovered",))]


def value(result: dict, path: tuple[str, ...]):
    for key in path:
        result = result.get(key) if isinstance(result, dict) else None
    return result


def table(results: dict[str, dict]) -> str:
    lines = ["| metric (clean held-out) | trained on clean | trained on masked |", "|---|---|---|"]
    for name, path in ROWS:
        cells = [value(results[s], path) for s in ("clean", "masked")]
        lines.append(f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.4g}"
                                                  for v in cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ROWS), figsize=(3 * len(ROWS), 3.2), constrained_layout=True)
    for ax, (name, path) in zip(axes, ROWS, strict=True):
        vals = [value(results[s], path) or 0.0 for s in ("clean", "masked")]
        ax.bar(["clean", "masked"], vals, color=["tab:blue", "tab:orange"])
        ax.set_title(name, fontsize=8)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--cache", type=Path, default=None, help="default: OUT/cache")
    p.add_argument("--model", default="default")
    p.add_argument("--corpus", default="default")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--arch", default="masked")
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--train-tokens", type=int, default=262144)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--l1", type=float, default=4.0)
    p.add_argument("--ce-sequences", type=int, default=8)
    p.add_argument("--absorption-every", type=int, default=16)
    args = p.parse_args()
    cache = args.cache or args.out / "cache"
    print(f"extracting {cache}", file=sys.stderr)
    extract(ExtractConfig(out=str(cache), model=args.model, corpus=args.corpus,
                          layers=[args.layer], tokens=args.tokens, rows_per_chunk=4096))
    results = {}
    for stream in ("clean", "masked"):
        run = RunDir(args.out / f"sae_{stream}")
        if not run.summary.is_file():
            train(TrainConfig.from_flat(cache=str(cache), out=str(run), layer=args.layer, stream=stream,
                              arch=args.arch, expansion=args.expansion,
                              batch_size=args.batch_size, tokens=args.train_tokens, lr=args.lr,
                              l1=args.l1, mask_every=50, log_every=16, checkpoint_every=128,
                              holdout_chunks=1, resume=run.config.is_file()))
        results[stream] = evaluate(EvalConfig(run.path, ce_sequences=args.ce_sequences, stream="clean",
                                   model=None if args.model == "default" else args.model,
                                   absorption=True, absorption_every=args.absorption_every))
    md = table(results)
    (args.out / "compare.md").write_text(md + "\n")
    (args.out / "compare.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()},
         "results": {s: {name: value(r, path) for name, path in ROWS}
                     for s, r in results.items()}}, indent=1))
    plot(results, args.out / "compare.png")
    print(md)


if __name__ == "__main__":
    main()
