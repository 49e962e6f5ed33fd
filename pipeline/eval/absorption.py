"""First-letter feature absorption, step by step as SAEBench 0.6 computes it (Chanin et al.;
sae_bench/evals/absorption/, file:function in brackets), in our own code:

1. Words [vocab.py:get_alpha_tokens]: tokens whose text is letters only, a leading space allowed;
   we take every `every`-th by token id (letters.py:alpha_words).
2. Split [probing.py:create_dataset_probe_training]: words shuffled, the first 80% train, the
   rest test. Each word gets one prompt: "\\n" + 10 in-context examples "{ex} has the first
   letter: {L}" joined by "\\n", then "\\n{word} has the first letter:"; the examples are drawn
   at random for every prompt, never the word itself, from the word's own split. The residual
   stream after the SAE's layer is read at the word token (SAEBench's position -6).
3. Ground-truth probe [common.py:train_and_save_probes, probing.py:train_multi_probe]: 26
   one-vs-rest logistic probes on the train activations, Adam lr 1e-2 decayed to 1e-5 over 50
   epochs, batches of 64, weight decay 1e-4, pos_weight negatives/positives (probes.py).
   Its test F1 (logit > 0) decides which letters count: F1 > 0.6, and at least 20 such letters
   or no result [main.py:run_eval].
4. Main latents [k_sparse_probing.py:train_k_sparse_probes, add_feature_splits_to_metrics_df]:
   an L1 probe over the SAE latents of the train words (the same trainer, one batch of 4096,
   50 epochs, L1 0.01, weight decay 1e-6) ranks each letter's latents by weight; for k = 1..10
   the top k get a balanced logistic regression (sklearn's, C = 1) and its test F1; k grows while
   F1 rises by more than 0.03 over the last accepted k. Those k latents are the letter's main
   (split) latents.
5. Scored words [feature_absorption.py:get_stats_and_likely_false_negative_tokens]: the test
   words of the letter that its probe accepts (logit > 0), each in a fresh prompt whose 10
   examples come from all the words [feature_absorption_calculator.py:calculate_absorption].
6. Per word [same]: p is the unit probe direction, a latent's projection is z_i * cos(W_dec_i, p)
   (its contribution along p only if |W_dec_i| = 1: SAEBench warns otherwise, and so do we).
   Absorption fraction: 0 if the main latents' projection reaches x . p or the top 3 other
   latents with cos >= 0.1 and positive projection carry less than 40% of x . p; 1 if the main
   latents' projection is <= 0; else absorbed / (absorbed + main), absorbed = min(top-3 sum,
   x . p - main). Full absorption: every main latent < 1e-8, the top projecting latent has
   cos >= 0.025, x . p >= 0, and it carries >= 40% of x . p.
7. A letter's values are sums over its scored words divided by their number; the means are over
   the letters of step 3 [main.py:_aggregate_results_df].

Deliberate differences, none of which changes the definition: every random draw (split, examples,
probe initialisation and batches) comes from `seed`, where SAEBench's RNG is unseeded (its
`random_seed` is never used) so two runs differ; prompts are cut after the word token (the model
is causal: the activation there is the same) and each is read at its own word token, where
SAEBench reads position -6 of right-padded batches (a shorter prompt would be read off its word);
a letter with too few words is skipped instead of crashing (SAEBench needs every letter in both
splits). The article's downstream false-positive-rate change is reported beside SAEBench's
metrics: how much more often each letter's probe accepts other letters' test words when it reads
the SAE's reconstruction instead of the residual.
"""

from __future__ import annotations

import string
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.eval.probes import balanced_logistic, f1, one_thread, train_probes

LETTERS = string.ascii_uppercase


@dataclass
class AbsorptionConfig:
    every: int = 8
    """Take every n-th alphabetic single-token word (by token id)."""
    n_icl: int = 10
    """In-context examples per prompt (SAEBench: 10)."""
    train_fraction: float = 0.8
    seed: int = 0
    """Seed of every random draw: split, in-context examples, probe training."""
    probe_batch_size: int = 64
    probe_epochs: int = 50
    probe_lr: float = 1e-2
    probe_weight_decay: float = 1e-4
    sparse_l1: float = 0.01
    sparse_batch_size: int = 4096
    sparse_epochs: int = 50
    sparse_weight_decay: float = 1e-6
    max_k: int = 10
    """Most main latents per letter."""
    f1_jump: float = 0.03
    """A k-sparse probe with one more latent must beat the last F1 by more than this."""
    min_probe_f1: float = 0.6
    """Letters whose ground-truth probe has a test F1 not above this are left out."""
    min_letters: int = 20
    """Fewer letters above min_probe_f1 give no result (SAEBench: 20)."""
    absorbing_cos: float = 0.1
    full_cos: float = 0.025
    proportion: float = 0.4
    max_absorbing: int = 3
    template: str = "{word} has the first letter:"
    batch_size: int = 32
    """Prompts per forward pass."""


def first_letter(word: str) -> str:
    return word.strip()[0].upper()


def split_words(n: int, cfg: AbsorptionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the train and test words (shuffled, the first train_fraction train)."""
    order = np.random.default_rng([cfg.seed, 1]).permutation(n)
    cut = int(n * cfg.train_fraction)
    return order[:cut], order[cut:]


@dataclass
class LetterResult:
    letter: str
    probe_f1: float
    main_latents: list[int] = field(default_factory=list)
    sparse_f1: list[float] = field(default_factory=list)
    """Test F1 of the k-sparse probes, k = 1, 2, ... up to the first one rejected."""
    words: int = 0
    """Scored words: test words of this letter that its probe accepts."""
    mean_absorption_fraction: float = 0.0
    full_absorption_rate: float = 0.0
    false_positive_rate: float = 0.0
    """Of the test words not starting with the letter, the fraction its probe accepts."""
    false_positive_rate_reconstructed: float = 0.0
    """The same probe applied to the SAE's reconstruction of those words' activations."""
    evaluated_words: list[int] = field(default_factory=list)
    """Word indices (into the word list) of the scored words."""
    fully_absorbed_words: list[int] = field(default_factory=list)


def main_latents(order: list[int], z_tr, y_tr, z_te, y_te, cfg: AbsorptionConfig,
                 ) -> tuple[list[int], list[float]]:
    """SAEBench's feature-splitting rule over the k-sparse probes on the top-k of `order`."""
    best, chosen, scores = -100.0, [], []
    for k in range(1, len(order) + 1):
        coef, icpt = balanced_logistic(z_tr[:, order[:k]], y_tr)
        scores.append(f1((z_te[:, order[:k]] @ coef + icpt) > 0, y_te))
        if scores[-1] <= best + cfg.f1_jump:
            break
        best, chosen = scores[-1], order[:k]
    return chosen, scores


def word_absorption(acts, z, probe, cos, main: list[int], cfg: AbsorptionConfig):
    """Absorption fraction [n] and full-absorption flag [n] of each word (step 6)."""
    total = acts @ probe
    proj = z * cos
    main_proj = proj[:, main].sum(1)
    others = torch.ones(len(cos), dtype=torch.bool)
    others[main] = False
    cand = torch.where(others & (cos >= cfg.absorbing_cos) & (proj > 0), proj, 0.0)
    absorbing = cand.topk(min(cfg.max_absorbing, cand.shape[1]), dim=1).values.sum(1)
    zero = (total <= 0) | (main_proj >= total) | (absorbing < cfg.proportion * total)
    taken = torch.minimum(absorbing, total - main_proj)
    fraction = torch.where(main_proj <= 0, 1.0,
                           (taken / (taken + main_proj).clamp_min(1e-30)).clamp(0, 1))
    fraction = torch.where(zero, 0.0, fraction)
    top_proj, top = proj.max(1)
    full = ((z[:, main] < 1e-8).all(1) & (cos[top] >= cfg.full_cos) & (total > 0)
            & (top_proj >= cfg.proportion * total))
    return fraction, full


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def absorption_scores(train_acts: torch.Tensor, train_labels: torch.Tensor,
                      test_acts: torch.Tensor, test_labels: torch.Tensor,
                      rescore: Callable[[list[int]], torch.Tensor], sae,
                      cfg: AbsorptionConfig, test_words: list[int] | None = None) -> dict:
    """Steps 3-7 from the residual activations of the train and test prompts and their letter
    indices (0-25). `rescore(positions)` gives the activations of those test words in fresh
    prompts (step 5); `test_words` names the test words in the output (default 0, 1, ...)."""
    with one_thread():
        w, results, scored = _probe_letters(train_acts, train_labels, test_acts, test_labels,
                                            sae, cfg)
    positions = [i for rows in scored.values() for i in rows]
    acts = rescore(positions) if positions else test_acts[:0]
    names = list(range(len(test_labels))) if test_words is None else list(test_words)
    w_dec = sae.W_dec.detach().float()
    norms = w_dec.norm(dim=1)
    if (norms - 1).abs().max() > 1e-2:
        print(f"warning: decoder rows are not unit-norm (norms {float(norms.min()):.3g}-"
              f"{float(norms.max()):.3g}): SAEBench's projection z_i * cos, which absorption "
              "follows, understates such latents' share of the probe projection by their norm",
              file=sys.stderr)
    with torch.no_grad():
        z = sae.encode(acts)
    start = 0
    for res in results:
        rows = scored.get(res.letter, [])
        if not rows:
            continue
        x, zi = acts[start:start + len(rows)], z[start:start + len(rows)]
        start += len(rows)
        probe = w[LETTERS.index(res.letter)]
        probe = probe / probe.norm()
        cos = F.cosine_similarity(probe[None], w_dec, dim=-1)
        fraction, full = word_absorption(x, zi, probe, cos, res.main_latents, cfg)
        res.words = len(rows)
        res.evaluated_words = [names[i] for i in rows]
        res.fully_absorbed_words = [names[i] for i, f in zip(rows, full.tolist(), strict=True)
                                    if f]
        res.mean_absorption_fraction = float(fraction.sum()) / len(rows)
        res.full_absorption_rate = float(full.sum()) / len(rows)
    out = _summary(results, cfg, len(train_labels), len(test_labels))
    out["decoder_norm_range"] = [float(norms.min()), float(norms.max())]
    return out


def _probe_letters(train_acts, train_labels, test_acts, test_labels, sae, cfg):
    """Steps 3-5: the probe weights, a LetterResult per letter with its probe F1,
    false-positive rates and main latents, and per counted letter its scored test words."""
    seeds = np.random.SeedSequence([cfg.seed, 3]).generate_state(2)
    w, b = train_probes(train_acts, F.one_hot(train_labels, 26), batch_size=cfg.probe_batch_size,
                        epochs=cfg.probe_epochs, lr=cfg.probe_lr,
                        weight_decay=cfg.probe_weight_decay, seed=int(seeds[0]))
    with torch.no_grad():
        z_tr, z_te = sae.encode(train_acts), sae.encode(test_acts)
        x_hat = sae.decode(z_te)
    l1_w, _ = train_probes(z_tr, F.one_hot(train_labels, 26), batch_size=cfg.sparse_batch_size,
                           epochs=cfg.sparse_epochs, lr=cfg.probe_lr, l1=cfg.sparse_l1,
                           weight_decay=cfg.sparse_weight_decay, seed=int(seeds[1]))
    logits = test_acts @ w.T + b
    results, scored = [], {}
    for li, letter in enumerate(LETTERS):
        y_tr, y_te = train_labels == li, test_labels == li
        if not y_tr.any() or y_tr.all() or not y_te.any():
            continue  # SAEBench would fail here; the letter cannot be probed
        accept = logits[:, li] > 0
        res = LetterResult(letter, f1(accept, y_te))
        negatives = ~y_te
        res.false_positive_rate = float(accept[negatives].float().mean())
        res.false_positive_rate_reconstructed = float(
            ((x_hat[negatives] @ w[li] + b[li]) > 0).float().mean())
        order = l1_w[li].topk(min(cfg.max_k, z_tr.shape[1])).indices.tolist()
        res.main_latents, res.sparse_f1 = main_latents(order, z_tr, y_tr, z_te, y_te, cfg)
        results.append(res)
        if res.probe_f1 > cfg.min_probe_f1:
            scored[letter] = torch.nonzero(y_te & accept).flatten().tolist()
    return w, results, scored


def _summary(results: list[LetterResult], cfg: AbsorptionConfig, n_train: int, n_test: int,
             ) -> dict:
    """Step 7, SAEBench's means over the letters whose probe F1 is above min_probe_f1."""
    used = [r for r in results if r.probe_f1 > cfg.min_probe_f1 and r.words]
    good = len([r for r in results if r.probe_f1 > cfg.min_probe_f1])
    enough = good >= cfg.min_letters
    frac = [r.mean_absorption_fraction for r in used] if enough else []
    return {
        "mean_absorption_fraction": _mean(frac),
        "mean_full_absorption": _mean([r.full_absorption_rate for r in used] if enough else []),
        "std_absorption_fraction": float(np.std(frac, ddof=1)) if len(frac) > 1 else None,
        "mean_num_split_features": _mean([len(r.main_latents) for r in used] if enough else []),
        "downstream_fpr_change": _mean([r.false_positive_rate_reconstructed
                                        - r.false_positive_rate for r in used]),
        "letters_used": [r.letter for r in used],
        "too_few_letters": None if enough else (
            f"only {good} letters have a probe F1 above {cfg.min_probe_f1}, SAEBench needs "
            f"{cfg.min_letters}: no absorption result"),
        "letters": [asdict(r) for r in results],
        "n_train": n_train,
        "n_test": n_test,
        "config": asdict(cfg),
    }
