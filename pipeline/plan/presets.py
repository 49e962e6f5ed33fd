"""Model shapes `pipeline plan` knows by name, so a job can be sized without the weights: the
published config.json values of each model (only what sizes depend on)."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError

_LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, rope_theta=500000.0,
               max_position_embeddings=8192, tie_word_embeddings=False)
PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32,
                         max_position_embeddings=131072),
    "llama-3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rope_theta=10000.0,
                       tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
}
"""Llama-architecture shapes by name ('default' is smollm2-135m, the embedded model)."""


def model_config(model: str):
    """(transformers config, name) of a preset, an HF folder (its config.json alone) or a .gguf
    file; PipelineError naming the presets for anything else."""
    from transformers import AutoConfig, LlamaConfig

    name = "smollm2-135m" if model == "default" else model
    if name in PRESETS:
        return LlamaConfig(**PRESETS[name]), name
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from pipeline.models import load_config, resolve_model

        src = resolve_model(model)
        return load_config(src), src.name
    if (path / "config.json").is_file():
        try:
            return AutoConfig.from_pretrained(path), path.name
        except (OSError, ValueError) as e:
            raise PipelineError(f"cannot read the model config {path / 'config.json'}: {e}") from e
    raise PipelineError(
        f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}, or 'default'), an HF model "
        "folder with a config.json, or a .gguf file. Plans need only the config: copy a model's "
        "config.json into a folder to plan for a model that is not a preset.")
