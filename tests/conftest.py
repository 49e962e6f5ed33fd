"""Shared fixtures: a tiny random Llama with its own tokenizer, and a small corpus."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pipeline.models.synthetic import WORDS


def make_corpus(folder: Path, n_docs: int = 12, words_per_doc: int = 600, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(WORDS) for _ in range(words_per_doc))
        (folder / f"doc{i:03d}.txt").write_text(text.capitalize() + ".\n")
    return folder


def make_tiny_llama(folder: Path, n_layers: int = 4, d_model: int = 64) -> Path:
    """Save a random LlamaForCausalLM and a trained byte-level BPE tokenizer to folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_model, corpus) -> Path:
    """A complete cache of the tiny model: layers 1 and 2, 4 chunks of 256 rows."""
    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.run import extract

    out = tmp_path_factory.mktemp("caches") / "tiny"
    extract(ExtractConfig(out=str(out), model=str(tiny_model), corpus=str(corpus), layers=[1, 2],
                          tokens=1024, context_length=32, rows_per_chunk=256, batch_size=4,
                          mask_rate=0.3, device="cpu"), progress=False)
    return out
