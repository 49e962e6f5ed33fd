"""Model locating and loading, shared by extract, eval and features."""

from pipeline.models.load import (
    decoder_layers,
    input_device,
    load_config,
    load_model_of,
    load_tokenizer,
    load_truncated,
    model_source_of,
    tokenizer_hash,
)
from pipeline.models.packed import packed_linears
from pipeline.models.source import (
    DEFAULT_GGUF,
    DEFAULT_NAME,
    DEFAULT_PACKAGE,
    ModelSource,
    file_digest,
    folder_fingerprint,
    resolve_model,
)

__all__ = [
    "DEFAULT_GGUF",
    "DEFAULT_NAME",
    "DEFAULT_PACKAGE",
    "ModelSource",
    "decoder_layers",
    "file_digest",
    "folder_fingerprint",
    "input_device",
    "load_config",
    "load_model_of",
    "load_tokenizer",
    "load_truncated",
    "model_source_of",
    "packed_linears",
    "resolve_model",
    "tokenizer_hash",
]
