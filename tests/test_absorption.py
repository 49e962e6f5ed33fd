"""Absorption on a constructed case whose answer is known, SAEBench's per-word rules on hand-made
numbers, its probes against sklearn's optimum, and the prompt/activation plumbing."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch

from pipeline.eval.absorption import (
    AbsorptionConfig,
    absorption_scores,
    main_latents,
    split_words,
    word_absorption,
)
from pipeline.eval.letters import alpha_words, icl_prompt, prompt_ids, word_activations
from pipeline.eval.probes import balanced_logistic, train_probes

D = 26 + 20 + 4  # letter directions, one direction per absorbed word, noise


class HandBuiltSAE:
    """Latent i < 26 reads letter i; latent 26 + j reads absorbed word j's own direction and
    writes mostly the letter-A direction, and latent 0 (A) is switched off by any of them. The
    last `n_idle` latents never fire: SAEBench's L1 probe (50 steps from nn.Linear's init of
    scale 1/sqrt(d_sae)) ranks latents as intended only in a wide SAE, as real ones are."""

    def __init__(self, n_absorbed: int, n_idle: int = 1000):
        d_sae = 26 + n_absorbed + n_idle
        self.W_enc = torch.zeros(D, d_sae)
        self.W_dec = torch.zeros(d_sae, D)
        idle = torch.randn(n_idle, D, generator=torch.Generator().manual_seed(1))
        self.W_dec[26 + n_absorbed:] = idle / idle.norm(dim=1, keepdim=True)
        for i in range(26):
            self.W_enc[i, i] = 1.0
            self.W_dec[i, i] = 1.0
        for j in range(n_absorbed):
            t = 26 + j
            self.W_enc[t, 26 + j] = 1.0
            self.W_enc[t, 0] = -10.0
            self.W_dec[26 + j, 0], self.W_dec[26 + j, t] = 0.9, 0.436
        self.b_enc = torch.full((d_sae,), -1.0)

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, z):
        return z @ self.W_dec


def constructed_case(n_a=200, n_other=40, n_absorbed=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts, letters, absorbed = [], [], set()
    for li in range(26):
        for i in range(n_a if li == 0 else n_other):
            x = 0.05 * torch.randn(D, generator=g)
            x[26:26 + n_absorbed] = 0.0  # noise there would switch latent A off at random
            x[li] += 3.0
            if li == 0 and i < n_absorbed:
                x[26 + i] += 3.0
                absorbed.add(len(letters))
            acts.append(x)
            letters.append(li)
    return torch.stack(acts), torch.tensor(letters), absorbed


def scores(acts, labels, sae, cfg=None):
    """absorption_scores on a train/test split of the constructed words; the fresh prompts of
    step 5 read the same activations (there is no model)."""
    cfg = cfg or AbsorptionConfig()
    train, test = split_words(len(labels), cfg)
    return absorption_scores(acts[train], labels[train], acts[test], labels[test],
                             lambda pos: acts[test[pos]], sae, cfg, test_words=test.tolist())


def test_absorption_finds_exactly_the_absorbed_words():
    acts, labels, absorbed = constructed_case()
    result = scores(acts, labels, HandBuiltSAE(20))
    by_letter = {r["letter"]: r for r in result["letters"]}
    assert set(result["letters_used"]) == set(string.ascii_uppercase)
    a = by_letter["A"]
    assert a["main_latents"] == [0]
    expected = [i for i in a["evaluated_words"] if i in absorbed]
    assert expected and a["fully_absorbed_words"] == expected
    assert a["full_absorption_rate"] == len(expected) / len(a["evaluated_words"])
    assert a["mean_absorption_fraction"] == a["full_absorption_rate"]  # absorbed words: 1.0 each
    for letter in string.ascii_uppercase[1:]:
        assert by_letter[letter]["full_absorption_rate"] == 0.0
        assert by_letter[letter]["mean_absorption_fraction"] == 0.0
    assert abs(result["mean_full_absorption"] - a["full_absorption_rate"] / 26) < 1e-9
    # reconstructions keep each letter's direction: the probes accept almost no more negatives
    assert abs(result["downstream_fpr_change"]) < 0.02
    assert result["decoder_norm_range"] == pytest.approx([1.0, 1.0], abs=1e-3)


def test_the_same_seed_gives_the_same_result_and_another_seed_another_split():
    acts, labels, _ = constructed_case()
    one, two = scores(acts, labels, HandBuiltSAE(20)), scores(acts, labels, HandBuiltSAE(20))
    assert one == two
    other = scores(acts, labels, HandBuiltSAE(20), AbsorptionConfig(seed=1))
    assert other["letters"][0]["evaluated_words"] != one["letters"][0]["evaluated_words"]


def test_false_positive_rate_change_counts_probe_hits_on_reconstructions():
    acts, labels, _ = constructed_case(n_absorbed=0)
    sae = HandBuiltSAE(0)
    sae.W_dec[1, 0] = 3.0  # latent B writes a strong A component: B words now look like A
    result = scores(acts, labels, sae)
    a = next(r for r in result["letters"] if r["letter"] == "A")
    assert a["false_positive_rate"] == 0.0 and a["false_positive_rate_reconstructed"] > 0.0
    assert result["downstream_fpr_change"] > 0.0


def test_no_absorption_without_absorbing_latents():
    acts, labels, _ = constructed_case(n_absorbed=0)
    result = scores(acts, labels, HandBuiltSAE(0))
    assert result["mean_full_absorption"] == 0.0 and result["mean_absorption_fraction"] == 0.0


def test_fewer_letters_than_saebench_needs_give_no_result():
    acts, labels, _ = constructed_case(n_absorbed=0)
    result = scores(acts, labels, HandBuiltSAE(0), AbsorptionConfig(min_letters=27))
    assert result["mean_absorption_fraction"] is None and result["too_few_letters"]


def test_word_rules_follow_saebench_case_by_case():
    cfg = AbsorptionConfig()
    probe = torch.tensor([1.0, 0.0])
    # latents: 0 main; 1, 2, 3, 4 aligned (cos 1, 0.5, 0.2, 0.6); 5 barely aligned (cos 0.05)
    cos = torch.tensor([1.0, 1.0, 0.5, 0.2, 0.6, 0.05])
    acts = torch.tensor([[10.0, 0.0]] * 5)
    z = torch.tensor([
        [10.0, 0, 0, 0, 0, 0],  # main carries all of it: no absorption
        [6.0, 1.0, 2.0, 5.0, 0, 0],  # others carry 1 + 1 + 1 = 3 < 40%: none
        [2.0, 4.0, 4.0, 10.0, 0, 0],  # top 3 others 4 + 2 + 2 = 8, unaccounted 8: 8 / 10
        [0.0, 0, 0, 0, 10.0, 0],  # main silent, one latent carries 6 of 10: full, fraction 1
        [0.0, 0, 0, 0, 0, 100.0],  # main silent, top latent cos 0.05 < 0.1: fraction 0, full
    ])
    fraction, full = word_absorption(acts, z, probe, cos, [0], cfg)
    assert torch.allclose(fraction, torch.tensor([0.0, 0.0, 0.8, 1.0, 0.0]))
    assert full.tolist() == [False, False, False, True, True]
    # a negative probe projection is never absorption
    fraction, full = word_absorption(-acts[3:4], z[3:4], probe, cos, [0], cfg)
    assert fraction.tolist() == [0.0] and full.tolist() == [False]


def test_feature_splitting_stops_when_f1_stops_jumping():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4 == 0
    # latents 0 and 1 each fire on half the letter's words, latent 2 on noise
    z = torch.zeros(400, 3)
    z[y & (torch.arange(400) % 8 == 0), 0] = 1.0
    z[y & (torch.arange(400) % 8 == 4), 1] = 1.0
    z[:, 2] = torch.rand(400, generator=g)
    chosen, f1s = main_latents([0, 1, 2], z[:200], y[:200], z[200:], y[200:], AbsorptionConfig())
    assert chosen == [0, 1] and len(f1s) == 3 and f1s[1] > f1s[0] + 0.03


def test_balanced_logistic_reaches_sklearns_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(300, generator=g)) > 1.0
    coef, icpt = balanced_logistic(x, y)
    # the gradient of sum c_i logloss_i + |w|^2 / 2 vanishes at the optimum
    c = torch.where(y, 300 / (2 * y.sum()), 300 / (2 * (~y).sum())).double()
    p = torch.sigmoid(x.double() @ coef.double() + icpt)
    resid = c * (p - y.double())
    assert torch.allclose(x.double().T @ resid + coef.double(), torch.zeros(3, dtype=torch.float64),
                          atol=1e-5)
    assert abs(float(resid.sum())) < 1e-5


def test_probes_learn_separable_letters_and_depend_on_the_seed():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(520) % 26
    x = torch.nn.functional.one_hot(labels, 26).float() * 3 + 0.1 * torch.randn(520, 26, generator=g)
    y = torch.nn.functional.one_hot(labels, 26)
    w, b = train_probes(x, y, batch_size=64, weight_decay=1e-4, seed=0)
    assert ((x @ w.T + b).argmax(1) == labels).all()
    w2, _ = train_probes(x, y, batch_size=64, weight_decay=1e-4, seed=1)
    assert not torch.equal(w, w2)


def test_icl_prompts_never_show_the_word_and_draw_uniformly():
    texts = [" apple", "Bear", " cat", " dog", "Egg"]
    cfg = AbsorptionConfig(n_icl=2)
    rng = np.random.default_rng(0)
    seen = {}
    for _ in range(600):
        prompt = icl_prompt(2, [0, 1, 2, 3, 4], texts, cfg, rng)
        lines = prompt.split("\n")
        assert lines[0] == "" and lines[-1] == " cat has the first letter:"
        assert len(lines) == 4 and all(" cat " not in line for line in lines[1:-1])
        for line in lines[1:-1]:
            word = line.split(" has")[0]
            assert line == f"{word} has the first letter: {word.strip()[0].upper()}"
            seen[word] = seen.get(word, 0) + 1
    assert set(seen) == {" apple", "Bear", " dog", "Egg"}
    assert min(seen.values()) > 250  # 300 each expected


def test_prompts_are_read_at_the_word_token(tiny_model):
    from transformers import AutoTokenizer

    from pipeline.models import ModelSource, load_truncated

    tok = AutoTokenizer.from_pretrained(tiny_model)
    words = alpha_words(tok, every=1)
    assert words and all(w[1].strip().isalpha() for w in words)
    texts = [t for _, t in words]
    cfg = AbsorptionConfig(n_icl=3)
    rng = np.random.default_rng(0)
    prompts = [icl_prompt(i, list(range(len(texts))), texts, cfg, rng) for i in range(8)]
    rows = prompt_ids(tok, prompts, cfg)
    assert [r[-1] for r in rows] == [tid for tid, _ in words[:8]]
    src = ModelSource("tiny", str(tiny_model), "x")
    base = load_truncated(src, 2, torch.float32, "cpu")
    acts = word_activations(base, 1, rows, batch_size=3)
    assert acts.shape == (8, base.config.hidden_size)
    # one prompt alone gives the same activation as in a padded batch
    alone = word_activations(base, 1, rows[5:6])
    assert torch.allclose(alone[0], acts[5], atol=1e-5)
    # the read block's MLP runs at the read positions only: the same as a plain forward's
    # output of block 1 there (from a deeper stack: the last of hidden_states is normed)
    deeper = load_truncated(src, 3, torch.float32, "cpu")
    for i, r in enumerate(rows):
        full = deeper(input_ids=torch.tensor([r]), output_hidden_states=True).hidden_states[2]
        assert torch.allclose(acts[i], full[0, -1], atol=1e-5), i


def test_read_positions_only_keeps_a_tuple_returning_mlp():
    """A mixture-of-experts MLP returns (hidden, router logits); the hooks made its hidden part
    full-size at the read positions and passed the rest on."""
    from pipeline.eval.letters import ReadPositionsOnly

    class MoE(torch.nn.Module):
        def forward(self, x):
            return 2 * x, x.sum(-1)

    block = torch.nn.Module()
    block.mlp = MoE()
    hooks = ReadPositionsOnly(block)
    hooks.positions = torch.tensor([1, 3])
    x = torch.randn(2, 4, 5)
    hidden, logits = block.mlp(x)
    assert hidden.shape == x.shape and logits.shape == (2, 1)
    assert torch.equal(hidden[0, 1], 2 * x[0, 1]) and torch.equal(hidden[1, 3], 2 * x[1, 3])
    assert hidden[0, 0].abs().sum() == 0
    hooks.remove()
    assert block.mlp(x)[0].shape == x.shape
