"""Random-init models for tests and benchmarks: a Llama with any shape (a preset's, or a tiny one
with the same structure) saved with a small byte-level BPE tokenizer that has Llama-3's special
tokens, so extraction runs on it exactly as on the real model, with no download."""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]
"""BOS, EOS, the reserved token extraction masks with, and others a chat template uses."""
WORDS = ("the of and to in a is that for it as was with be by on not he i this are or his from "
         "at which but have an they you were her she there been one all we their has would when "
         "state nation congress people government law war peace trade treaty year public union "
         "country power duty army navy money bank tax act report great new").split()


def llama3_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on WORDS, with Llama-3's special tokens (no unk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=LLAMA3_SPECIALS[0],
                                   eos_token=LLAMA3_SPECIALS[1],
                                   additional_special_tokens=LLAMA3_SPECIALS[2:])


def save_random_llama(folder: Path, config: dict, tokenizer, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", seed: int = 0):
    """Save a random LlamaForCausalLM of `config` (LlamaConfig fields; vocab_size defaults to
    the tokenizer's), built on `device` in `dtype`, and the tokenizer; returns its config."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{"vocab_size": len(tokenizer), **config,
                         "bos_token_id": tokenizer.bos_token_id,
                         "eos_token_id": tokenizer.eos_token_id})
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: seconds, not minutes on the CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return cfg
