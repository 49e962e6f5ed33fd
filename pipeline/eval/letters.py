"""The model side of the first-letter absorption eval (pipeline.eval.absorption): SAEBench's word
list, its in-context prompts, and the residual stream at each prompt's word token."""

from __future__ import annotations

import string
from collections.abc import Callable
from contextlib import ExitStack

import numpy as np
import torch

from pipeline.eval.absorption import (
    LETTERS,
    AbsorptionConfig,
    absorption_scores,
    first_letter,
    split_words,
)
from pipeline.models import decoder_layers, packed_linears

ALPHA = set(string.ascii_letters)


def alpha_words(tokenizer, every: int) -> list[tuple[int, str]]:
    """(token id, text) of the tokens SAEBench's get_alpha_tokens keeps (letters only, one
    leading space allowed), every n-th by token id."""
    words = []
    for tid in range(len(tokenizer)):
        token = tokenizer.convert_ids_to_tokens(tid)
        text = tokenizer.convert_tokens_to_string([token])
        if token.startswith("▁") and not text.startswith(" "):
            text = " " + text  # SAEBench's fix for sentencepiece's dropped leading space
        core = text[1:] if text.startswith(" ") else text
        if core and set(core) <= ALPHA:
            words.append((tid, text))
    return words[::every]


def icl_prompt(word: int, pool: list[int], texts: list[str], cfg: AbsorptionConfig,
               rng: np.random.Generator) -> str:
    """SAEBench's create_icl_prompt: n_icl examples drawn from `pool` (word indices, the word
    among them), never the word itself, in random order, then the word's query."""
    n = min(cfg.n_icl, len(pool) - 1)
    # n + 1 draws, the word dropped if drawn (else the last): uniform over n-subsets without it
    picks = [pool[i] for i in rng.choice(len(pool), n + 1, replace=False)]
    picks = [p for p in picks if p != word][:n]
    lines = [f"{cfg.template.format(word=texts[p])} {first_letter(texts[p])}" for p in picks]
    return "\n" + "\n".join([*lines, cfg.template.format(word=texts[word])])


def prompt_ids(tok, prompts: list[str], cfg: AbsorptionConfig) -> list[list[int]]:
    """Token ids of each prompt with BOS, cut after the word token (the template's tail after
    {word} is dropped: the model is causal, the activation at the word does not see it)."""
    tail = cfg.template.split("{word}", 1)[1]
    n_tail = len(tok.encode(tail, add_special_tokens=False)) if tail else 0
    head = [tok.bos_token_id] if tok.bos_token_id is not None else []
    rows = []
    for p in prompts:
        ids = head + tok.encode(p, add_special_tokens=False)
        rows.append(ids[:len(ids) - n_tail])
    return rows


class ReadPositionsOnly:
    """Hooks that make the read block's MLP (position-wise) run at each row's read position
    only: the block's output elsewhere is never read, and its MLP is most of its work. Other
    positions get a zero MLP output. No-op for a block without an `mlp` submodule."""

    def __init__(self, block: torch.nn.Module):
        self.positions: torch.Tensor | None = None
        mlp = getattr(block, "mlp", None)
        self.handles = [] if mlp is None else [
            mlp.register_forward_pre_hook(self._gather),
            mlp.register_forward_hook(self._scatter)]

    def _gather(self, _m, args):
        x = args[0]
        self.shape, self.rows = x.shape, torch.arange(x.shape[0], device=x.device)
        return (x[self.rows, self.positions.to(x.device)].unsqueeze(1), *args[1:])

    def _scatter(self, _m, _args, output):
        # a mixture-of-experts MLP returns (hidden, router logits): the logits are not read
        hidden = output[0] if isinstance(output, tuple) else output
        full = hidden.new_zeros(self.shape)
        full[self.rows, self.positions.to(hidden.device)] = hidden[:, 0]
        return (full, *output[1:]) if isinstance(output, tuple) else full

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def word_activations(base, layer: int, rows: list[list[int]], batch_size: int = 32,
                     progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Residual stream after block `layer` at the last token of every row. Rows of like length
    share a batch, right-padded (a causal model: padding after a token does not change it). The
    forward is nearly all linear layers: on CPU their weights are packed once (models.packed)."""
    captured = {}

    def hook(_m, _i, output):
        captured["h"] = (output[0] if isinstance(output, tuple) else output).float()

    block = decoder_layers(base)[layer]
    device = next(base.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.empty(len(rows), base.config.hidden_size)
    with ExitStack() as stack:
        stack.callback(block.register_forward_hook(hook).remove)
        read_only = ReadPositionsOnly(block)
        stack.callback(read_only.remove)
        stack.enter_context(packed_linears(base, batch_size * 80))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            lengths = torch.tensor([len(rows[i]) for i in idx])
            ids = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
            for j, i in enumerate(idx):
                ids[j, :len(rows[i])] = torch.tensor(rows[i])
            read_only.positions = lengths - 1
            base(input_ids=ids.to(device), use_cache=False)
            h = captured.pop("h")
            out[idx] = h[torch.arange(len(idx)), lengths.to(h.device) - 1].cpu()
            if progress is not None:
                progress(len(idx))
    return out


class WordSample:
    """The words, their split and the residual activations of their prompts, which do not
    depend on the SAE: one sample serves every SAE of a model and layer. The fresh prompts of
    the scored words (step 5) are made on first request and kept: with the same seed every SAE
    asks for the same words."""

    def __init__(self, tok, base, layer: int, cfg: AbsorptionConfig,
                 progress: Callable[[int], None] | None = None):
        self.tok, self.base, self.layer, self.cfg, self.progress = tok, base, layer, cfg, progress
        self.texts = [t for _, t in alpha_words(tok, cfg.every)]
        self.labels = torch.tensor([LETTERS.index(first_letter(t)) for t in self.texts])
        self.train, self.test = split_words(len(self.texts), cfg)
        self.rng = np.random.default_rng([cfg.seed, 2])
        self.lengths: list[int] = []
        self.train_acts = self._acts(self.train.tolist(), self.train.tolist())
        self.test_acts = self._acts(self.test.tolist(), self.test.tolist())
        self._fresh: dict[tuple[int, ...], torch.Tensor] = {}

    def _acts(self, indices: list[int], pool: list[int]) -> torch.Tensor:
        prompts = [icl_prompt(i, pool, self.texts, self.cfg, self.rng) for i in indices]
        rows = prompt_ids(self.tok, prompts, self.cfg)
        self.lengths.extend(len(r) for r in rows)
        return word_activations(self.base, self.layer, rows, self.cfg.batch_size, self.progress)

    def fresh(self, positions: list[int]) -> torch.Tensor:
        """Activations of test words (by position in the test split) in fresh prompts whose
        examples come from all the words."""
        key = tuple(positions)
        if key not in self._fresh:
            words = [int(self.test[p]) for p in positions]
            self._fresh[key] = self._acts(words, list(range(len(self.texts))))
        return self._fresh[key]

    def score(self, sae) -> dict:
        result = absorption_scores(self.train_acts, self.labels[self.train], self.test_acts,
                                   self.labels[self.test], self.fresh, sae, self.cfg,
                                   test_words=self.test.tolist())
        result["n_words"] = len(self.texts)
        return result

    def record(self) -> dict:
        """The word sample, to save beside the result."""
        return {"every": self.cfg.every, "seed": self.cfg.seed, "words": self.texts,
                "train": self.train.tolist(), "test": self.test.tolist(),
                "prompt_tokens": [min(self.lengths), max(self.lengths)]}


def measure_absorption(tok, base, layer: int, sae, cfg: AbsorptionConfig,
                       progress: Callable[[int], None] | None = None) -> tuple[dict, dict]:
    """The absorption result of `sae` on the words of `tok`, and the word sample to record."""
    sample = WordSample(tok, base, layer, cfg, progress)
    return sample.score(sae), sample.record()
