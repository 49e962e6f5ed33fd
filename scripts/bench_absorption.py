"""Our first-letter absorption (pipeline.eval) against SAEBench 0.6's own eval on the same SAEs
and the same word sample (every n-th alphabetic token of the embedded SmolLM2): per SAE both
means, per-letter absorption fractions, the per-letter correlation and mean absolute difference
of ours against each SAEBench run and of SAEBench's two runs against each other (its noise
floor: its probes are trained afresh, unseeded), and the run times. Prints one JSON object.

SAEBench runs in its own environment (`--saebench-python`, one with `pip install -e
".[saebench]"`) through scripts/saebench_absorption.py; without one only ours runs. Both sides
run the model on CPU cut after the SAE's layer. A SAEBench run's time is its probe phase (the
prompts of every word and the ground-truth probe, shared by the SAEs of a run) plus its per-SAE
phase: what one SAE costs on a fresh install.

    python scripts/bench_absorption.py --random runs/random --sae masked=runs/demo \\
        --sae topk=runs/topk --saebench-python /work/venv-saebench/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import models
from pipeline.eval.absorption import AbsorptionConfig
from pipeline.eval.letters import WordSample, alpha_words
from pipeline.run import load_saelens, save_saelens
from pipeline.sae import build_sae, sae_config

HOOK = "blocks.{layer}.hook_resid_post"


def make_random_sae(folder: Path, d_in: int, d_sae: int, layer: int, name: str) -> None:
    """A freshly initialised ReLU SAE (never trained), saved for both sides."""
    sae = build_sae(sae_config("relu", d_in, d_sae), torch.Generator().manual_seed(0))
    save_saelens(folder, sae, 1.0, {"hook_name": HOOK.format(layer=layer), "model_name": name})


def compare(a: dict, b: dict) -> dict:
    """Per-letter correlation and mean absolute difference over the letters both counted, and
    the difference of the means."""
    common = sorted(set(a["letters"]) & set(b["letters"]))
    x = np.array([a["letters"][k] for k in common])
    y = np.array([b["letters"][k] for k in common])
    corr = float(np.corrcoef(x, y)[0, 1]) if len(common) > 2 and x.std() and y.std() else None
    return {"letters": len(common), "correlation": corr,
            "mean_abs_diff": float(np.abs(x - y).mean()) if common else None,
            "diff_of_means": abs(a["mean"] - b["mean"])}


def ours_view(result: dict) -> dict:
    return {"mean": result["mean_absorption_fraction"],
            "mean_full": result["mean_full_absorption"],
            "letters": {r["letter"]: r["mean_absorption_fraction"] for r in result["letters"]
                        if r["letter"] in result["letters_used"]}}


def saebench_view(res: dict) -> dict:
    return {"mean": res["mean_absorption_fraction"], "mean_full": res["mean_full_absorption"],
            "letters": {k: v["absorption_fraction"] for k, v in res["letters"].items()}}


def _means(comparisons: list[dict]) -> dict:
    corrs = [c["correlation"] for c in comparisons if c["correlation"] is not None]
    return {"pairs": len(comparisons),
            "mean_abs_diff": float(np.mean([c["mean_abs_diff"] for c in comparisons])),
            "diff_of_means": float(np.mean([c["diff_of_means"] for c in comparisons])),
            "correlation": float(np.mean(corrs)) if corrs else None}


def verdict(name: str, ours: list[dict], sb: list[dict], ours_s: float, sb_s: float) -> dict:
    """The issue's targets for one SAE: ours within 25% of SAEBench's own run-to-run distance
    (per-letter MAD and difference of means, each averaged over every pair of SAEBench runs and
    every pair of our seed and a SAEBench run), or both under 0.01; >= 3x faster."""
    floor = _means([compare(a, b) for i, a in enumerate(sb) for b in sb[i + 1:]])
    vs = _means([compare(o, s) for o in ours for s in sb])
    mad, dmean = vs["mean_abs_diff"], vs["diff_of_means"]
    out = {"ours_vs_saebench": vs, "saebench_vs_saebench": floor,
           "ours_mad": mad, "ours_diff_of_means": dmean,
           "within_noise": bool((mad <= 1.25 * floor["mean_abs_diff"]
                                 and dmean <= 1.25 * floor["diff_of_means"])
                                or (mad < 0.01 and dmean < 0.01)),
           "speedup": sb_s / ours_s}
    if name == "random":
        out["correlation_target_met"] = bool(vs["correlation"] is not None
                                             and vs["correlation"] >= 0.9)
    return out


def run_ours(src, tok, layer: int, saes: dict, args) -> tuple[dict, float, float]:
    """Our results per SAE and seed, what one SAE costs alone and what all of them cost on one
    word sample (seconds, means over the seeds)."""
    base = models.load_truncated(src, layer + 1, torch.float32, "cpu")
    loaded = {name: load_saelens(folder) for name, folder in saes.items()}
    ours: dict[str, list[dict]] = {name: [] for name in saes}
    alone, every = [], []
    for seed in range(args.seeds):
        # the prompts' activations do not depend on the SAE: one sample serves all of them
        t0 = time.perf_counter()
        cfg = AbsorptionConfig(every=args.every, seed=seed, min_letters=args.min_letters)
        sample = WordSample(tok, base, layer, cfg)
        sample_s, score_s = time.perf_counter() - t0, []
        for name, sae in loaded.items():
            t0 = time.perf_counter()
            result = sample.score(sae)  # the first call also runs the fresh prompts (step 5)
            score_s.append(time.perf_counter() - t0)
            ours[name].append(ours_view(result))
            print(f"ours {name} seed {seed}: {result['mean_absorption_fraction']}",
                  file=sys.stderr)
        # what one SAE costs alone: all of the sample's prompts plus the slowest scoring
        alone.append(sample_s + max(score_s))
        every.append(sample_s + sum(score_s))
        print(f"ours seed {seed}: {alone[-1]:.0f} s for one SAE, {every[-1]:.0f} s for all",
              file=sys.stderr)
    return ours, float(np.mean(alone)), float(np.mean(every))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", action="append", default=[], help="NAME=SAE_FOLDER")
    ap.add_argument("--random", help="folder for the random SAE (made if missing)")
    ap.add_argument("--d-sae", type=int, default=2304, help="width of the random SAE")
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=1, help="our runs per SAE (seeds 0..n-1)")
    ap.add_argument("--saebench-python", help="a Python with sae-bench; omitted: ours only")
    ap.add_argument("--saebench-runs", type=int, default=2)
    ap.add_argument("--saebench-first-seed", type=int, default=0,
                    help="SAEBench's runs seed from here (more runs beside earlier ones)")
    ap.add_argument("--saebench-json", action="append", help="SAEBench's output from an earlier "
                    "run of scripts/saebench_absorption.py on the same words, instead of running "
                    "it (repeat: their runs are joined)")
    ap.add_argument("--ours-json", help="our results from an earlier run (WORK/ours.json)")
    ap.add_argument("--min-letters", type=int, default=20,
                    help="both sides: fewer letters with probe F1 > 0.6 give no result")
    ap.add_argument("--work", help="folder for the word list and SAEBench's files")
    args = ap.parse_args()

    src = models.resolve_model("default")
    tok = models.load_tokenizer(src)
    saes = dict(spec.split("=", 1) for spec in args.sae)
    first = load_saelens(next(iter(saes.values()))) if saes else None
    layer = int((first.cfg["metadata"]["hook_name"] if first else HOOK.format(layer=6))
                .split(".")[1])
    if args.random:
        if not (Path(args.random) / "cfg.json").exists():
            make_random_sae(Path(args.random), models.load_config(src).hidden_size, args.d_sae,
                            layer, src.name)
        saes = {"random": args.random, **saes}
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_absorption_"))
    work.mkdir(parents=True, exist_ok=True)
    words = [t for _, t in alpha_words(tok, args.every)]
    (work / "words.json").write_text(json.dumps({"every": args.every, "words": words}))

    if args.ours_json:
        saved = json.loads(Path(args.ours_json).read_text())
        ours, ours_s, all_s = saved["ours"], saved["seconds"], saved.get("all_seconds")
    else:
        ours, ours_s, all_s = run_ours(src, tok, layer, saes, args)
    out = {"every": args.every, "words": len(words), "layer": layer,
           "min_letters": args.min_letters, "saes": {}}
    (work / "ours.json").write_text(json.dumps({"seconds": ours_s, "all_seconds": all_s,
                                                "ours": ours}))
    sb_runs = None
    if args.saebench_json:
        sb_runs = [run for f in args.saebench_json
                   for run in json.loads(Path(f).read_text().strip().splitlines()[-1])["runs"]]
    elif args.saebench_python:
        cmd = [args.saebench_python, str(Path(__file__).with_name("saebench_absorption.py")),
               "--model", src.path, "--layer", str(layer), "--words", str(work / "words.json"),
               "--runs", str(args.saebench_runs), "--work", str(work / "saebench"),
               "--first-seed", str(args.saebench_first_seed),
               "--min-letters", str(args.min_letters),
               *[f"--sae={n}={f}" for n, f in saes.items()]]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        (work / "saebench.json").write_text(done.stdout)  # for --saebench-json later
        sb_runs = json.loads(done.stdout.strip().splitlines()[-1])["runs"]
    if sb_runs:
        out["saebench_seeds"] = [run["seed"] for run in sb_runs]
        # every SAE on one word sample: ours shares the prompts, SAEBench only its probe phase
        sb_all = float(np.mean([run["probe_seconds"] + sum(r["seconds"] for r in run["saes"].values())
                                for run in sb_runs]))
        if all_s:
            out["all_saes"] = {"saes": len(saes), "ours_seconds": all_s,
                               "saebench_seconds": sb_all, "speedup": sb_all / all_s}
    for name in saes:
        entry = {"ours": ours[name], "ours_seconds": ours_s}
        if len(ours[name]) > 1:
            entry["ours_seed_vs_seed"] = compare(ours[name][0], ours[name][1])
        if sb_runs:
            done_runs = [run for run in sb_runs if name in run["saes"]]  # a run stopped early
            sb = [saebench_view(run["saes"][name]) for run in done_runs]
            sb_s = float(np.mean([run["probe_seconds"] + run["saes"][name]["seconds"]
                                  for run in done_runs])) if done_runs else None
            entry.update(saebench=sb, saebench_seconds=sb_s)
            if len(sb) > 1 and all(s["mean"] is not None for s in sb) and ours[name][0]["mean"] \
                    is not None:
                entry.update(verdict(name, ours[name], sb, ours_s, sb_s))
        out["saes"][name] = entry
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
