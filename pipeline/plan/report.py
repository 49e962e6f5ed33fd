"""`pipeline plan`: size an extraction and a training run from a model's config alone."""

from __future__ import annotations

from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.plan.estimate import (
    extract_estimate,
    free_bytes,
    human,
    measure_tflops,
    model_shape,
    train_estimate,
)
from pipeline.plan.presets import model_config


def make_plan(cfg, tflops: float | None, arch: str, d_sae: int | None, expansion: int,
              train_batch_size: int) -> dict:
    """The plan of extracting with `cfg` (an ExtractConfig) and training one SAE for one epoch
    of the result: a JSON-ready dict."""
    config, name = model_config(cfg.model)
    shape = model_shape(config, name, max(cfg.layers))
    if shape.max_positions and cfg.context_length > shape.max_positions:
        raise PipelineError(f"context length {cfg.context_length} exceeds the {shape.max_positions} "
                            f"positions of {name}")
    device = resolve_device(cfg.device) if cfg.device != "auto" else "cuda"
    compute = cfg.compute_dtype
    if compute == "auto":
        compute = "float32" if device == "cpu" else "bfloat16"
    measured_on = None
    if tflops is None:
        measured_on = resolve_device("auto")
        tflops = measure_tflops(measured_on, compute if measured_on != "cpu" else "float32")
    if tflops <= 0:
        raise PipelineError(f"--tflops must be positive, got {tflops}")
    ext = extract_estimate(shape, len(cfg.layers), cfg.tokens, cfg.context_length,
                           cfg.batch_size, cfg.rows_per_chunk, cfg.dtype, compute, tflops)
    where, free = free_bytes(cfg.out)
    n_sae = d_sae or expansion * shape.d_model
    train = train_estimate(arch, shape.d_model, n_sae, train_batch_size,
                           ext["tokens_per_stream"])
    return {"model": name, "n_layers": shape.n_layers, "d_model": shape.d_model,
            "layers": list(cfg.layers), "context_length": cfg.context_length,
            "storage_dtype": cfg.dtype, "compute_dtype": compute, "device": device,
            "tflops_measured_on": measured_on, "extract": ext,
            "out": str(where), "free_bytes": free, "fits": ext["disk_bytes"] <= free,
            "train": train}


def format_plan(p: dict) -> str:
    e, t = p["extract"], p["train"]
    on = p["tflops_measured_on"]
    rate = "given" if on is None else f"a matmul measured on this machine's {on}"
    if on is not None and on.split(":")[0] != p["device"].split(":")[0]:
        rate += f"; pass --tflops with the {p['device']} rate"
    hours = e["seconds"] / 3600
    lines = [
        f"{p['model']}: {p['n_layers']} layers, d_model {p['d_model']}; storing layer(s) "
        f"{', '.join(map(str, p['layers']))}, clean + masked, {p['storage_dtype']}",
        "",
        f"cache       {human(e['disk_bytes'])} for {e['tokens_per_stream']:,} tokens per stream "
        f"({human(e['bytes_per_token'])} per token)",
        f"disk        {human(p['free_bytes'])} free at {p['out']}: "
        + ("fits" if p["fits"] else "DOES NOT FIT"),
        f"extraction  {e['model_params'] / 1e9:.2f} B parameters loaded ({p['compute_dtype']} on "
        f"{p['device']}): {human(e['weights_bytes'])} weights + ~{human(e['activation_bytes'])} "
        f"activations = ~{human(e['device_bytes'])} on the device; "
        f"~{human(e['host_bytes'])} host memory",
        f"time        {e['flops']:.3g} FLOP at {e['tflops']:.3g} TFLOP/s ({rate}): {hours:.3g} h "
        "at that rate; divide by the utilisation reached (MFU)",
        "",
        f"training    {t['arch']} SAE, d_sae {t['d_sae']:,}, batch {t['batch_size']}, "
        f"{t['steps']:,} steps for one epoch",
        f"memory      {human(t['params_bytes'])} parameters + {human(t['gradient_bytes'])} "
        f"gradients + {human(t['optimizer_bytes'])} Adam + ~{human(t['activation_bytes'])} "
        f"activations = ~{human(t['total_bytes'])}",
    ]
    return "\n".join(lines)
