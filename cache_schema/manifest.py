"""The cache manifest: what a cache holds, how it was made, and its content-derived id.

The manifest is stored as the `manifest` attribute of the cache's root Zarr group (its
`zarr.json`). Fields split in two: *identity* fields determine every byte of the arrays and are
hashed into the cache id; descriptive names (model_name, corpus_source) and *state* fields (status,
norm statistics, chunks digest) are not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cache_schema.errors import CacheError

SCHEMA_VERSION = 1
STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
CODECS = ("none", "zstd", "blosc-lz4")
MASK_STRATEGIES = ("mask-token", "random-token")
STREAMS = ("clean", "masked")


def hook_name(layer: int) -> str:
    """TransformerLens/SAELens name of the residual stream after block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def layer_of_hook(hook: str) -> int | None:
    """The layer whose hook_name() is `hook`; None for any other string."""
    parts = str(hook).split(".")
    if len(parts) == 3 and parts[1].isdecimal() and hook_name(int(parts[1])) == hook:
        return int(parts[1])
    return None


@dataclass
class Manifest:
    """Everything a reader needs to interpret a cache. See cache_schema/SPEC.md."""

    model_name: str
    """Model id as the user gave it (hub id, folder name, or the embedded default's name)."""
    model_fingerprint: str
    """SHA-256 over the model's config and weight file names and sizes (or the GGUF file)."""
    model_revision: str | None
    """Hub revision, when one was given."""
    compute_dtype: str
    """dtype the model ran in (float32, bfloat16, float16)."""
    device_type: str
    """cpu or cuda: the bytes depend on it."""
    layers: list[int]
    """Hooked layers; hook names are blocks.{L}.hook_resid_post."""
    n_model_layers: int
    """Layers of the full model (the extraction ran only up to max(layers))."""
    d_model: int
    """Width of every activation row."""
    context_length: int
    """Tokens per sequence, BOS included."""
    n_sequences: int
    """Sequences in the cache; N = n_sequences * context_length rows."""
    rows_per_chunk: int
    """Rows per chunk of every array; a multiple of context_length."""
    batch_size: int
    """Sequences per forward pass (clean + masked copies make 2x this batch)."""
    storage_dtype: str
    """float32, float16, or bfloat16 (stored as uint16 bit patterns)."""
    codec: str
    """none, zstd, or blosc-lz4."""
    mask_rate: float
    """Probability that an eligible input position is replaced in the masked stream."""
    mask_strategy: str
    """mask-token (replace with mask_token_id) or random-token (a random non-special token)."""
    mask_token_id: int
    """Token used by the mask-token strategy."""
    mask_seed: int
    """Seed of the masking; sequence s uses numpy default_rng([seed, s])."""
    bos_token_id: int
    """Token at position 0 of every sequence; never masked."""
    special_token_ids: list[int]
    """Never masked, and left out of the norm statistics (outlier norms)."""
    tokenizer_hash: str
    """SHA-256 of the tokenizer's serialized vocabulary and settings."""
    corpus_source: str
    """Where the text came from (default corpus name or the path as given)."""
    corpus_fingerprint: str
    """SHA-256 of the packed int32 token array [n_sequences, context_length]."""
    schema_version: int = SCHEMA_VERSION
    status: str = STATUS_WRITING
    """writing or complete. Readers refuse a cache that is not complete."""
    norm_stats: dict[str, Any] = field(default_factory=dict)
    """Per hook, per stream: L2 norm statistics over non-special tokens (set when complete)."""
    chunks_digest: str | None = None
    """SHA-256 over all chunk records in order (set when complete)."""
    cache_id: str = ""
    """Content-derived id: sha256 of the identity fields, 16 hex characters."""

    # Not hashed into the id: names that describe (the fingerprints pin the content), and state.
    NON_IDENTITY_FIELDS = ("model_name", "corpus_source", "status", "norm_stats", "chunks_digest",
                           "cache_id")

    def __post_init__(self) -> None:
        self.validate()
        expected = self.compute_id()
        if self.cache_id and self.cache_id != expected:
            raise CacheError(
                f"manifest cache_id {self.cache_id} does not match its content ({expected}): "
                "the manifest was edited or is corrupt; re-extract the cache"
            )
        self.cache_id = expected

    @property
    def hooks(self) -> list[str]:
        return [hook_name(layer) for layer in self.layers]

    @property
    def n_tokens(self) -> int:
        return self.n_sequences * self.context_length

    @property
    def n_chunks(self) -> int:
        return self.n_tokens // self.rows_per_chunk

    @property
    def sequences_per_chunk(self) -> int:
        return self.rows_per_chunk // self.context_length

    @property
    def chunks_per_batch(self) -> int:
        """Chunks one forward batch spans (SPEC.md §3): 1 unless batch_size exceeds the
        sequences per chunk."""
        return max(1, self.batch_size // self.sequences_per_chunk)

    def identity(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in self.NON_IDENTITY_FIELDS:
            d.pop(k)
        return d

    def compute_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self) -> None:
        def bad(msg: str) -> CacheError:
            return CacheError(f"invalid cache manifest: {msg}")

        if self.schema_version != SCHEMA_VERSION:
            raise CacheError(
                f"cache schema version {self.schema_version} is not supported (this reader knows "
                f"version {SCHEMA_VERSION}); re-extract the cache or upgrade the pipeline"
            )
        if self.status not in (STATUS_WRITING, STATUS_COMPLETE):
            raise bad(f"status must be '{STATUS_WRITING}' or '{STATUS_COMPLETE}', got {self.status!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise bad(f"storage_dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype!r}")
        if self.codec not in CODECS:
            raise bad(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.mask_strategy not in MASK_STRATEGIES:
            raise bad(f"mask_strategy must be one of {MASK_STRATEGIES}, got {self.mask_strategy!r}")
        if not self.layers or sorted(set(self.layers)) != list(self.layers):
            raise bad(f"layers must be a sorted list of distinct layers, got {self.layers}")
        if any(not 0 <= layer < self.n_model_layers for layer in self.layers):
            raise bad(f"layers {self.layers} out of range for a {self.n_model_layers}-layer model")
        if self.context_length < 2 or self.rows_per_chunk % self.context_length:
            raise bad(
                f"rows_per_chunk ({self.rows_per_chunk}) must be a multiple of context_length "
                f"({self.context_length}), which must be at least 2"
            )
        if self.n_tokens % self.rows_per_chunk or self.n_sequences <= 0:
            raise bad(f"{self.n_tokens} rows is not a positive whole number of chunks")
        if not 0.0 <= self.mask_rate < 1.0:
            raise bad(f"mask_rate must be in [0, 1), got {self.mask_rate}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict):
            raise CacheError("invalid cache manifest: expected a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CacheError(
                f"cache schema version {version} is not supported (this reader knows version "
                f"{SCHEMA_VERSION}); re-extract the cache or upgrade the pipeline"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names if n not in d and _required(cls, n))
        unknown = sorted(set(d) - names)
        if missing or unknown:
            raise CacheError(
                f"invalid cache manifest: missing fields {missing}, unknown fields {unknown}"
            )
        try:
            return cls(**d)
        except TypeError as e:
            raise CacheError(f"invalid cache manifest: {e}") from e


def _required(cls: type, name: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
