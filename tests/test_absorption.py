"""Absorption on a constructed case whose answer is known, and the prompt/activation plumbing."""

from __future__ import annotations

import string

import torch

from pipeline.eval.absorption import (
    AbsorptionConfig,
    absorption_scores,
    alpha_words,
    build_prompts,
    word_activations,
)

D = 26 + 20 + 4  # letter directions, one direction per absorbed word, noise


class HandBuiltSAE:
    """Latent i < 26 reads letter i; latent 26 + j reads absorbed word j's own direction and
    writes mostly the letter-A direction, and latent 0 (A) is switched off by any of them."""

    def __init__(self, n_absorbed: int):
        d_sae = 26 + n_absorbed
        self.W_enc = torch.zeros(D, d_sae)
        self.W_dec = torch.zeros(d_sae, D)
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
    for li, letter in enumerate(string.ascii_uppercase):
        for i in range(n_a if li == 0 else n_other):
            x = 0.05 * torch.randn(D, generator=g)
            x[li] += 3.0
            if li == 0 and i < n_absorbed:
                x[26 + i] += 3.0
                absorbed.add(len(letters))
            acts.append(x)
            letters.append(letter)
    return torch.stack(acts), letters, absorbed


def test_absorption_finds_exactly_the_absorbed_words():
    acts, letters, absorbed = constructed_case()
    result = absorption_scores(acts, letters, HandBuiltSAE(20), AbsorptionConfig())
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


def test_false_positive_rate_change_counts_probe_hits_on_reconstructions():
    acts, letters, _ = constructed_case(n_absorbed=0)
    sae = HandBuiltSAE(0)
    sae.W_dec[1, 0] = 3.0  # latent B writes a strong A component: B words now look like A
    result = absorption_scores(acts, letters, sae, AbsorptionConfig())
    a = next(r for r in result["letters"] if r["letter"] == "A")
    assert a["false_positive_rate"] == 0.0 and a["false_positive_rate_reconstructed"] > 0.0
    assert result["downstream_fpr_change"] > 0.0


def test_no_absorption_without_absorbing_latents():
    acts, letters, _ = constructed_case(n_absorbed=0)
    result = absorption_scores(acts, letters, HandBuiltSAE(0), AbsorptionConfig())
    assert result["mean_full_absorption"] == 0.0 and result["mean_absorption_fraction"] == 0.0


def test_prompts_keep_the_word_token_at_a_fixed_position(tiny_model):
    from transformers import AutoTokenizer

    from pipeline.models import ModelSource, load_truncated

    tok = AutoTokenizer.from_pretrained(tiny_model)
    words = alpha_words(tok, every=1)
    assert words and all(w[1].strip().isalpha() for w in words)
    ids, pos, kept = build_prompts(tok, words, AbsorptionConfig(n_icl=2))
    assert ids.shape[0] == len(kept) > 0
    assert torch.equal(ids[:, pos], torch.tensor([tid for tid, _ in kept]))
    src = ModelSource("tiny", str(tiny_model), "x")
    base = load_truncated(src, 2, torch.float32, "cpu")
    acts = word_activations(base, 1, ids[:8], pos, batch_size=3)
    assert acts.shape == (min(8, len(ids)), base.config.hidden_size)
