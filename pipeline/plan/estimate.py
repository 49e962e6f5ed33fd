"""The arithmetic of `pipeline plan` and of extract's pre-flight check: disk bytes of a cache,
memory and time of an extraction, memory of training one SAE. Exact where the layout fixes it
(cache bytes, parameter counts of models and SAEs built on the meta device); estimates, said to
be such, for activations and time."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cache_schema import STREAMS, data_bytes
from cache_schema.dtypes import read_dtype
from pipeline.errors import PipelineError

WRITER_CHUNKS = 3
"""Chunks of activations extraction holds in host memory besides the group being computed: the
writer's queue of two (extract/writer.py) and the one it writes."""


@dataclass
class ModelShape:
    """What sizes depend on, of a model truncated after its highest stored layer."""

    name: str
    n_layers: int
    kept_layers: int
    d_model: int
    intermediate: int
    params: int
    embedding_params: int
    max_positions: int | None


def model_shape(config, name: str, top_layer: int) -> ModelShape:
    """Count the parameters of the stack extraction loads (embeddings and blocks 0..top_layer,
    no LM head) by building it on the meta device: exact, and no memory is allocated."""
    from transformers import AutoModelForCausalLM

    n_layers = config.num_hidden_layers
    if not 0 <= top_layer < n_layers:
        raise PipelineError(f"layer {top_layer} out of range: {name} has {n_layers} layers "
                            f"(0 to {n_layers - 1})")
    config.num_hidden_layers = top_layer + 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:top_layer + 1]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    config.num_hidden_layers = n_layers
    return ModelShape(name, n_layers, top_layer + 1, config.hidden_size,
                      getattr(config, "intermediate_size", 4 * config.hidden_size),
                      sum(p.numel() for p in base.parameters()),
                      sum(p.numel() for p in base.get_input_embeddings().parameters()),
                      getattr(config, "max_position_embeddings", None))


def flops_per_token(shape: ModelShape, context_length: int) -> float:
    """Forward FLOPs per token: 2 per non-embedding parameter plus attention's
    2 x layers x context x d_model (Kaplan et al. 2020, eq. 2.2)."""
    return (2 * (shape.params - shape.embedding_params)
            + 2 * shape.kept_layers * context_length * shape.d_model)


def measure_tflops(device: str, dtype: str, seconds: float = 0.5) -> float:
    """Dense matmul TFLOP/s of this machine in `dtype`: the rate extraction time is quoted at."""
    n = 4096 if device.startswith("cuda") else 1024
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    return 2 * n**3 * done / (time.perf_counter() - start) / 1e12


def extract_estimate(shape: ModelShape, n_hooks: int, tokens: int, context_length: int,
                     batch_size: int, rows_per_chunk: int, storage: str, compute: str,
                     tflops: float) -> dict:
    """Disk, memory and time of extracting `tokens` rows per stream (whole chunks)."""
    n_tokens = tokens // rows_per_chunk * rows_per_chunk
    c_bytes = torch.empty(0, dtype=getattr(torch, compute)).element_size()
    s_bytes = torch.empty(0, dtype=getattr(torch, read_dtype(storage))).element_size()
    in_flight = len(STREAMS) * batch_size * context_length  # rows of one forward pass
    # peak inside a block: the residual, q/k/v and attention output (about 4 x d_model) and the
    # MLP's gate, up and product (3 x intermediate); plus each stored layer's captured output
    activations = in_flight * (4 * shape.d_model + 3 * shape.intermediate
                               + n_hooks * shape.d_model) * c_bytes
    chunk = data_bytes(rows_per_chunk, shape.d_model, n_hooks, storage)
    flops = flops_per_token(shape, context_length) * len(STREAMS) * n_tokens
    return {
        "tokens_per_stream": n_tokens,
        "disk_bytes": data_bytes(n_tokens, shape.d_model, n_hooks, storage),
        "bytes_per_token": data_bytes(1, shape.d_model, n_hooks, storage),
        "model_params": shape.params,
        "weights_bytes": shape.params * c_bytes,
        "activation_bytes": activations,
        "device_bytes": shape.params * c_bytes + activations,
        # the group of chunks one forward batch spans (or one chunk), and the writer's
        "host_bytes": (max(1, batch_size // (rows_per_chunk // context_length)) + WRITER_CHUNKS)
        * chunk,
        "storage_bytes_per_value": s_bytes,
        "flops": flops,
        "tflops": tflops,
        "seconds": flops / (tflops * 1e12),
    }


def train_estimate(arch: str, d_in: int, d_sae: int, batch_size: int, tokens: int) -> dict:
    """Memory of training one SAE: parameters and buffers (counted on the meta device),
    gradients, Adam's two moments, and activations (an estimate: four float32 values per
    latent per row, the pre-activation, the activation and their gradients)."""
    from pipeline.sae.registry import build_sae, sae_config

    with torch.device("meta"):
        sae = build_sae(sae_config(arch, d_in, d_sae))
    params = sum(p.numel() * p.element_size() for p in sae.parameters())
    buffers = sum(b.numel() * b.element_size() for b in sae.buffers())
    activations = 4 * batch_size * (d_sae + d_in) * 4
    return {"arch": arch, "d_sae": d_sae, "batch_size": batch_size,
            "steps": tokens // batch_size, "params_bytes": params, "buffers_bytes": buffers,
            "gradient_bytes": params, "optimizer_bytes": 2 * params,
            "activation_bytes": activations,
            "total_bytes": 4 * params + buffers + activations}


def free_bytes(out: str | Path) -> tuple[Path, int]:
    """(the existing folder that `out` would be created under, its filesystem's free bytes)."""
    path = Path(out).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path, shutil.disk_usage(path).free


def human(n: float) -> str:
    """Bytes in binary units: 1.5 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_space(out: str | Path, needed: int, what: str, force: bool) -> None:
    """Refuse, naming the numbers, when `out`'s filesystem has less than `needed` bytes free
    (with force: warn and go on)."""
    where, free = free_bytes(out)
    if needed <= free:
        return
    text = (f"{what} needs {human(needed)} but the filesystem of {where} has {human(free)} free. "
            "Free some space, write elsewhere (--out), or lower --tokens; pass --force to start "
            "anyway (the run stops when the disk is full; a re-run resumes)")
    if not force:
        raise PipelineError(text)
    import sys

    print(f"warning: {text}", file=sys.stderr)
