"""Feature absorption on the first-letter task, as SAEBench measures it (Chanin et al.; absorption
fraction by Till), written from its definitions:

1. Words: single-token alphabetic tokens of the vocabulary (leading space allowed), every
   `every`-th by token id (deterministic; the sample is recorded in the output).
2. Prompts: a fixed in-context prefix of `n_icl` examples "{word} has the first letter: {L}",
   then "{word} has the first letter:"; the residual stream at the SAE's layer is read at the word
   token. The model runs only up to that layer.
3. Ground-truth probes: one logistic (one-vs-rest) probe per letter on the residual stream, trained
   on 80% of the words; letters whose test F1 is below `min_probe_f1` are left out.
4. Main latents: per letter, latents ranked by the difference of their mean activation between the
   letter's words and the rest; k grows from 1 to `max_k` until adding a latent raises the k-sparse
   probe's F1 by less than `f1_jump` (SAEBench ranks with an L1 probe; the rule is the same).
5. Per test word the probe says starts with the letter: each latent's projection onto the unit
   probe direction is z_i * (W_dec_i . p) (exact for any decoder norm). Absorption fraction: the
   part of the probe projection carried by up to 3 other aligned latents (cos >= 0.1) when they
   carry >= 40% of it; full absorption: no main latent fires and the top projecting latent
   (cos >= 0.025) carries >= 40% of the projection.
Reported: per letter and mean absorption fraction and full-absorption rate, and the downstream
false-positive-rate change of the article's checklist: how much more often each letter's probe
fires on other letters' words when it reads the SAE's reconstruction instead of the residual.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pipeline.models import decoder_layers

LETTERS = string.ascii_uppercase


@dataclass
class AbsorptionConfig:
    every: int = 8
    """Take every n-th alphabetic single-token word (by token id)."""
    n_icl: int = 4
    """In-context examples in the fixed prompt prefix."""
    min_probe_f1: float = 0.6
    """Letters whose ground-truth probe has a lower test F1 are left out."""
    max_k: int = 10
    """Most main latents per letter."""
    f1_jump: float = 0.03
    """Stop adding main latents when F1 rises by less than this."""
    min_words: int = 4
    """Letters with fewer test words are left out."""
    seed: int = 0
    """Seed of the train/test split and of the in-context examples."""
    absorbing_cos: float = 0.1
    full_cos: float = 0.025
    proportion: float = 0.4
    max_absorbing: int = 3
    template: str = "{word} has the first letter:"


def first_letter(word: str) -> str:
    return word.strip()[0].upper()


def alpha_words(tokenizer, every: int) -> list[tuple[int, str]]:
    """(token id, text) of single-token alphabetic words, every n-th by id."""
    words = []
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid])
        core = text[1:] if text.startswith(" ") else text
        if len(core) >= 2 and core.isascii() and core.isalpha():
            words.append((tid, text))
    return words[::every]


# -- probes (full-batch logistic regression in torch, no extra dependency) ----------------------
def fit_logistic(x: torch.Tensor, y: torch.Tensor, weight_decay: float = 1e-3,
                 steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary logistic regression (LBFGS) on standardised inputs; returns (w, b) in input units."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    pos = y.float().mean().clamp(1e-3, 1 - 1e-3)
    weights = torch.where(y, 0.5 / pos, 0.5 / (1 - pos))  # balanced classes
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(
            xs @ w + b, y.float(), weight=weights) + weight_decay * w.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    w_in = (w / sd).detach()
    return w_in, (b - (w * mu / sd).sum()).detach()


def f1(pred: torch.Tensor, y: torch.Tensor) -> float:
    tp = float((pred & y).sum())
    fp, fn = float((pred & ~y).sum()), float((~pred & y).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


@dataclass
class LetterResult:
    letter: str
    probe_f1: float
    main_latents: list[int] = field(default_factory=list)
    words: int = 0
    mean_absorption_fraction: float = 0.0
    full_absorption_rate: float = 0.0
    false_positive_rate: float = 0.0
    """Of the test words not starting with the letter, the fraction its probe accepts."""
    false_positive_rate_reconstructed: float = 0.0
    """The same probe applied to the SAE's reconstruction of those words' activations."""
    evaluated_words: list[int] = field(default_factory=list)
    """Indices of the test words the probe puts in this letter (the ones scored)."""
    fully_absorbed_words: list[int] = field(default_factory=list)


def main_latents(z_tr, y_tr, z_te, y_te, cfg: AbsorptionConfig) -> list[int]:
    """Latents of the smallest k-sparse probe after which F1 stops jumping."""
    diff = z_tr[y_tr].mean(0) - z_tr[~y_tr].mean(0)
    order = torch.argsort(diff, descending=True)[:cfg.max_k].tolist()
    best, chosen = -1.0, order[:1]
    for k in range(1, len(order) + 1):
        feats = order[:k]
        w, b = fit_logistic(z_tr[:, feats], y_tr, steps=50)
        score = f1((z_te[:, feats] @ w + b) > 0, y_te)
        if k > 1 and score - best < cfg.f1_jump:
            break
        best, chosen = max(best, score), feats
    return chosen


def absorption_scores(acts: torch.Tensor, letters: list[str], sae, cfg: AbsorptionConfig,
                      ) -> dict:
    """The absorption metrics from residual activations at the word token and their letters."""
    n = len(letters)
    rng = np.random.default_rng([cfg.seed, 1])
    test = torch.zeros(n, dtype=torch.bool)
    test[torch.from_numpy(rng.permutation(n)[: max(n // 5, 1)])] = True
    with torch.no_grad():
        z = sae.encode(acts)
        x_hat = sae.decode(z)
    lab = np.array(letters)
    results = []
    for letter in LETTERS:
        y = torch.from_numpy(lab == letter)
        if int((y & test).sum()) < cfg.min_words or int((y & ~test).sum()) < cfg.min_words:
            continue
        w, b = fit_logistic(acts[~test], y[~test])
        score = (acts @ w + b) > 0
        res = LetterResult(letter, f1(score[test], y[test]))
        if res.probe_f1 < cfg.min_probe_f1:
            results.append(res)
            continue
        negatives = test & ~y
        res.false_positive_rate = float(score[negatives].float().mean())
        res.false_positive_rate_reconstructed = float(
            ((x_hat[negatives] @ w + b) > 0).float().mean())
        res.main_latents = main_latents(z[~test], y[~test], z[test], y[test], cfg)
        words = torch.nonzero(test & y & score).flatten()
        fractions, full = word_absorption(acts[words], z[words], w / w.norm(), sae.W_dec,
                                          res.main_latents, cfg)
        res.words = len(words)
        res.evaluated_words = words.tolist()
        res.fully_absorbed_words = [int(i) for i, f in zip(words, full, strict=True) if f]
        if len(words):
            res.mean_absorption_fraction = float(np.mean(fractions))
            res.full_absorption_rate = float(np.mean(full))
        results.append(res)
    used = [r for r in results if r.probe_f1 >= cfg.min_probe_f1 and r.words]
    return {
        "mean_absorption_fraction": float(np.mean([r.mean_absorption_fraction for r in used]))
        if used else None,
        "mean_full_absorption": float(np.mean([r.full_absorption_rate for r in used]))
        if used else None,
        "downstream_fpr_change": float(np.mean(
            [r.false_positive_rate_reconstructed - r.false_positive_rate for r in used]))
        if used else None,
        "letters_used": [r.letter for r in used],
        "letters": [asdict(r) for r in results],
        "n_words": n,
        "config": asdict(cfg),
    }


def word_absorption(acts, z, probe, w_dec, main: list[int], cfg: AbsorptionConfig):
    """Absorption fraction and full-absorption flag of each word (SAEBench's rules)."""
    along = w_dec @ probe  # each latent's decoder component along the probe
    cos = along / w_dec.norm(dim=1).clamp_min(1e-12)
    not_main = torch.ones(len(along), dtype=torch.bool)
    not_main[main] = False
    fractions, full = [], []
    for x, zi in zip(acts, z, strict=True):
        total = float(x @ probe)
        proj = zi * along
        main_proj = float(proj[main].sum())
        cand = proj[not_main & (cos >= cfg.absorbing_cos) & (proj > 0)]
        absorbing = float(cand.topk(min(cfg.max_absorbing, cand.numel())).values.sum())
        if total <= 0 or main_proj >= total or absorbing / total < cfg.proportion:
            fraction = 0.0
        elif main_proj <= 0:
            fraction = 1.0
        else:
            taken = min(absorbing, total - main_proj)
            fraction = float(np.clip(taken / (taken + main_proj), 0.0, 1.0))
        top = int(torch.argmax(proj))
        is_full = (bool((zi[main] <= 1e-8).all()) and float(cos[top]) >= cfg.full_cos
                   and total > 0 and float(proj[top]) / total >= cfg.proportion)
        fractions.append(fraction)
        full.append(is_full)
    return fractions, full


# -- the model side: prompts and residual activations at the word token -------------------------
def build_prompts(tok, words: list[tuple[int, str]], cfg: AbsorptionConfig):
    """Token ids [n, length] of the prompts (BOS + fixed ICL prefix + query), the word position,
    and the words kept (those whose token survives tokenization in place)."""
    rng = np.random.default_rng([cfg.seed, 2])
    examples = [words[i][1] for i in rng.choice(len(words), min(cfg.n_icl, len(words)),
                                                 replace=False)]
    prefix = "".join(f"{cfg.template.format(word=e)} {first_letter(e)}\n" for e in examples)
    head = [tok.bos_token_id, *tok.encode(prefix, add_special_tokens=False)]
    rows, kept = [], []
    for tid, text in words:
        ids = head + tok.encode(cfg.template.format(word=text), add_special_tokens=False)
        if ids[len(head)] == tid:
            rows.append(ids)
            kept.append((tid, text))
    if not rows:
        raise ValueError("no prompt keeps its word as one token")
    length = max(set(map(len, rows)), key=[len(r) for r in rows].count)
    keep = [i for i, r in enumerate(rows) if len(r) == length]
    return torch.tensor([rows[i] for i in keep]), len(head), [kept[i] for i in keep]


@torch.no_grad()
def word_activations(base, layer: int, ids: torch.Tensor, pos: int, batch_size: int = 32,
                     progress=None) -> torch.Tensor:
    """Residual stream after block `layer` at position `pos` of every prompt."""
    captured = {}

    def hook(_m, _i, output):
        captured["h"] = (output[0] if isinstance(output, tuple) else output)[:, pos].float()

    handle = decoder_layers(base)[layer].register_forward_hook(hook)
    device = next(base.parameters()).device
    out = []
    try:
        for i in range(0, len(ids), batch_size):
            base(input_ids=ids[i:i + batch_size].to(device), use_cache=False)
            out.append(captured.pop("h").cpu())
            if progress is not None:
                progress(min(batch_size, len(ids) - i))
    finally:
        handle.remove()
    return torch.cat(out)
