"""Load the causal LM (tokenizer, config, the truncated decoder stack, the full model) that
extract, eval and features run."""

from __future__ import annotations

import hashlib
import json

import torch

from cache_schema import Manifest
from pipeline.errors import PipelineError
from pipeline.models.source import DEFAULT_NAME, ModelSource, resolve_model

# transformers is imported inside the functions, as in source.py: slow to import, not always needed.


def _from_pretrained(auto_class: str, src: ModelSource, what: str, trust_remote_code: bool):
    """`transformers.<auto_class>.from_pretrained` of the model; a failure names `what`."""
    import transformers

    try:
        return getattr(transformers, auto_class).from_pretrained(
            src.path, revision=src.revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise PipelineError(f"could not load {what} of {src.name}: {e}") from e


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    return _from_pretrained("AutoTokenizer", src, "the tokenizer", trust_remote_code)


def tokenizer_hash(tok) -> str:
    """SHA-256 of the tokenizer's vocabulary and special tokens."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps({"vocab": vocab, "special": tok.all_special_tokens,
                       "bos": tok.bos_token_id}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def load_config(src: ModelSource, trust_remote_code: bool = False):
    return _from_pretrained("AutoConfig", src, "the model config", trust_remote_code)


def load_truncated(src: ModelSource, n_layers: int, dtype: torch.dtype, device: str,
                   device_map: str | None = None, trust_remote_code: bool = False):
    """The model's decoder stack (no LM head) with only its first n_layers blocks."""
    from transformers import AutoModelForCausalLM

    config = load_config(src, trust_remote_code)
    config.num_hidden_layers = n_layers  # never build the upper blocks
    if hasattr(config, "layer_types") and config.layer_types:
        config.layer_types = config.layer_types[:n_layers]
    kwargs = dict(revision=src.revision, config=config, dtype=dtype,
                  trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif device != "cpu":
        kwargs["device_map"] = {"": device}
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the skipped upper blocks are reported as unexpected keys
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except OSError as e:
        raise PipelineError(f"could not load model {src.name}: {e}") from e
    finally:
        hf_logging.set_verbosity(level)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    base.eval().requires_grad_(False)
    return base


def input_device(base) -> torch.device:
    """Where input ids go: the embedding's device, or the CPU when accelerate has offloaded it
    (its weights then sit on the meta device and a hook brings them in for each forward)."""
    for p in base.get_input_embeddings().parameters():
        return p.device if p.device.type != "meta" else torch.device("cpu")
    return torch.device("cpu")


def decoder_layers(base) -> torch.nn.ModuleList:
    """The list of transformer blocks of a decoder stack."""
    for attr in ("layers", "h", "blocks"):
        if isinstance(getattr(base, attr, None), torch.nn.ModuleList):
            return getattr(base, attr)
    raise PipelineError(f"cannot find the transformer blocks of {type(base).__name__}")


def model_source_of(m: Manifest, model: str | None) -> ModelSource:
    """Where the model that made the cache is (checked by fingerprint)."""
    name = model or ("default" if m.model_name == DEFAULT_NAME else m.model_name)
    try:
        src = resolve_model(name, m.model_revision)
    except PipelineError as e:
        raise PipelineError(f"cannot find the model that made this cache ({m.model_name}): {e}; "
                            "pass it with --model") from e
    if src.fingerprint != m.model_fingerprint:
        raise PipelineError(f"model {name} is not the one that made this cache (fingerprint "
                            f"{src.fingerprint[:12]} vs {m.model_fingerprint[:12]}); pass the "
                            "right one with --model")
    return src


def load_model_of(m: Manifest, model: str | None, device: str):
    """The full causal LM that made the cache."""
    from transformers import AutoModelForCausalLM

    src = model_source_of(m, model)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kwargs = {"dtype": dtype, "revision": src.revision}
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    return AutoModelForCausalLM.from_pretrained(src.path, **kwargs).eval()
