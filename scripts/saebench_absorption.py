"""SAEBench 0.6's own absorption eval on local files, for scripts/bench_absorption.py: run with the
Python of an environment that has `sae-bench` (pip install -e ".[saebench]"); it imports nothing
of this project. Prints JSON: per run and SAE, the means, per-letter values and seconds.

It calls SAEBench's experiment functions as its `run_eval` does (k-sparse probing, then feature
absorption, then `_aggregate_results_df` and the letter filter), with three local changes that
do not touch the algorithm: the word list is ours (every n-th word, so both sides see the same
words), TransformerLens gets the model from a local HF folder cut after the SAE's layer (nothing
can reach the hub here), and each run writes its probes and results to its own folder, so the
second run trains its probes afresh, as a fresh SAEBench install would. Each run seeds Python's
and torch's RNGs (split_seed says why), so two runs differ as two SAEBench runs do.

    python scripts/saebench_absorption.py --model DIR --layer 6 --words words.json \\
        --sae masked=runs/demo --runs 2 --work /tmp/saebench
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch


def load_model(folder: str, layer: int):
    """HookedTransformer of the local HF folder with only the blocks up to `layer`."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    official = loading.get_official_model_name
    # a local folder is not an "official" name; its config.json is read from disk instead
    loading.get_official_model_name = lambda name: name if Path(name).exists() else official(name)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    return HookedTransformer.from_pretrained_no_processing(
        folder, hf_model=hf, tokenizer=tok, first_n_layers=layer + 1, device="cpu",
        dtype=torch.float32)


def use_words(words: list[str]) -> None:
    """Make SAEBench's vocabulary our word sample (it calls get_alpha_tokens in two places)."""
    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.feature_absorption as feature_absorption

    common.get_alpha_tokens = lambda _tok: list(words)
    feature_absorption.get_alpha_tokens = lambda _tok: list(words)


def split_seed(words: list[str], start: int) -> int:
    """The first seed >= start whose split (probing.py:create_dataset_probe_training, the first
    draw from `random` in a run) puts every initial letter in both halves: SAEBench fails on a
    letter missing from either (roc_auc_score of one class, a missing k-sparse probe)."""
    letters = {w.strip()[0].upper() for w in words}
    for seed in range(start, start + 1000):
        random.seed(seed)
        shuffled = random.sample(words, len(words))
        cut = int(len(words) * 0.8)
        if all({w.strip()[0].upper() for w in half} == letters
               for half in (shuffled[:cut], shuffled[cut:])):
            return seed
    raise SystemExit("no split in 1000 seeds has every letter on both sides: take more words")


def letter_values(raw, f1: dict, min_f1: float) -> dict:
    """main.py:run_eval's per-letter values of the letters whose probe F1 is above min_f1."""
    from sae_bench.evals.absorption.main import _aggregate_results_df

    letters = {}
    for _, row in _aggregate_results_df(raw).iterrows():
        letter = row["letter"].upper()
        if f1[letter] > min_f1:
            letters[letter] = {"absorption_fraction": float(row["mean_absorption_fraction"]),
                               "full_absorption_rate": float(row["full_absorption_rate"]),
                               "words": int(row["num_probe_true_positives"]),
                               "main_latents": [int(i) for i in row["split_feats"]]}
    return {"mean_absorption_fraction": statistics.mean(
                v["absorption_fraction"] for v in letters.values()),
            "mean_full_absorption": statistics.mean(
                v["full_absorption_rate"] for v in letters.values()),
            "letters": letters}


def collect(work: Path, names: list[str], layer: int) -> list[dict]:
    """The runs under `work` read back from SAEBench's files, for runs stopped before they
    printed: the SAEs whose feature-absorption file exists. Times come from the files'
    modification times (the probes folder is made when the probe phase starts)."""
    import pandas as pd

    runs = []
    for folder in sorted(work.glob("seed*")):
        start = (folder / "probes").stat().st_mtime
        end = next((folder / "probes").glob(f"*/layer_{layer}/data.npz")).stat().st_mtime
        run = {"seed": int(folder.name[4:]), "probe_seconds": end - start, "saes": {}}
        for name in names:
            fa = folder / "feature_absorption" / name / f"layer_{layer}_{name}.parquet"
            if not fa.exists():
                break
            ksp = pd.read_parquet(folder / "k_sparse_probing" / name
                                  / f"layer_{layer}_{name}_metrics.parquet")
            f1 = dict(zip(ksp["letter"].str.upper(), ksp["f1_probe"], strict=True))
            run["saes"][name] = {**letter_values(pd.read_parquet(fa), f1, 0.6),
                                 "seconds": fa.stat().st_mtime - end}
            end = fa.stat().st_mtime
        runs.append(run)
    return runs


def run_one(model, sae, name: str, layer: int, work: Path, probes: Path, batch: int,
            min_letters: int) -> dict:
    """main.py:run_eval's body for one SAE, with its folders under `work`."""
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sae_bench.evals.absorption.feature_absorption import run_feature_absortion_experiment
    from sae_bench.evals.absorption.k_sparse_probing import run_k_sparse_probing_experiment

    cfg = AbsorptionEvalConfig(model_name=model.cfg.model_name, min_feats_for_eval=min_letters)
    ksp = run_k_sparse_probing_experiment(
        model=model, sae=sae, layer=layer, sae_name=name, force=True,
        max_k_value=cfg.max_k_value, f1_jump_threshold=cfg.f1_jump_threshold,
        prompt_template=cfg.prompt_template, prompt_token_pos=cfg.prompt_token_pos,
        device="cpu", experiment_dir=work / "k_sparse_probing", probes_dir=probes,
        k_sparse_probe_l1_decay=cfg.k_sparse_probe_l1_decay,
        k_sparse_probe_batch_size=cfg.k_sparse_probe_batch_size,
        k_sparse_probe_num_epochs=cfg.k_sparse_probe_num_epochs,
        eval_batch_size=cfg.eval_k_sparse_probe_batch_size, verbose=False)
    f1 = dict(zip(ksp["letter"].str.upper(), ksp["f1_probe"], strict=True))
    if sum(v > cfg.min_GT_probe_f1 for v in f1.values()) < cfg.min_feats_for_eval:
        return {"mean_absorption_fraction": None, "mean_full_absorption": None, "letters": {}}
    raw = run_feature_absortion_experiment(
        model=model, sae=sae, layer=layer, sae_name=name, force=True,
        max_k_value=cfg.max_k_value, feature_split_f1_jump_threshold=cfg.f1_jump_threshold,
        prompt_template=cfg.prompt_template, prompt_token_pos=cfg.prompt_token_pos,
        batch_size=batch, device="cpu", experiment_dir=work / "feature_absorption",
        sparse_probing_experiment_dir=work / "k_sparse_probing", probes_dir=probes)
    return letter_values(raw, f1, cfg.min_GT_probe_f1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF model folder")
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--words", required=True, help="JSON file with a 'words' list")
    ap.add_argument("--sae", action="append", required=True, help="NAME=SAELENS_FOLDER")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="runs take the first seeds from here whose split is usable")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--min-letters", type=int, default=20,
                    help="min_feats_for_eval: fewer letters with probe F1 > 0.6 give no result")
    ap.add_argument("--work", default="out/saebench", help="folder for SAEBench's files")
    ap.add_argument("--collect", action="store_true",
                    help="run nothing: read back the runs under --work (see collect)")
    args = ap.parse_args()
    if args.collect:
        names = [spec.split("=", 1)[0] for spec in args.sae]
        print(json.dumps({"runs": collect(Path(args.work), names, args.layer)}))
        return

    from sae_bench.evals.absorption.common import train_and_save_probes
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sae_bench.sae_bench_utils import general_utils
    from sae_lens import SAE

    torch.set_grad_enabled(True)  # run_eval does this first: the probes train under it
    words = json.loads(Path(args.words).read_text())["words"]
    use_words(words)
    t0 = time.perf_counter()
    model = load_model(args.model, args.layer)
    load_seconds = time.perf_counter() - t0
    saes = {}
    for spec in args.sae:
        name, folder = spec.split("=", 1)
        _, sae, _ = general_utils.load_and_format_sae(name, SAE.load_from_disk(folder, "cpu"), "cpu")
        saes[name] = sae.to(device="cpu", dtype=torch.float32)
    cfg = AbsorptionEvalConfig()
    runs = []
    seed = args.first_seed - 1
    for r in range(args.runs):
        # SAEBench never seeds (its random_seed is unused): we do, only to skip failing splits
        seed = split_seed(words, seed + 1)
        work = Path(args.work) / f"seed{seed}"
        random.seed(seed)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        # the ground-truth probe and its activations: per model and layer, shared by the SAEs
        train_and_save_probes(model, layers=[args.layer], base_template=cfg.prompt_template,
                              pos_idx=cfg.prompt_token_pos, probes_dir=work / "probes",
                              device="cpu", batch_size=64)
        run = {"seed": seed, "probe_seconds": time.perf_counter() - t0, "saes": {}}
        for name, sae in saes.items():
            t0 = time.perf_counter()
            res = run_one(model, sae, name, args.layer, work, work / "probes", args.batch_size,
                          args.min_letters)
            res["seconds"] = time.perf_counter() - t0
            run["saes"][name] = res
            print(f"saebench run {r} {name}: {res['mean_absorption_fraction']} "
                  f"({res['seconds']:.0f} s)", file=sys.stderr)
        runs.append(run)
    print(json.dumps({"load_seconds": load_seconds, "runs": runs}))


if __name__ == "__main__":
    main()
