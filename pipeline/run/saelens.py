"""Save and load SAEs in the SAELens folder format: cfg.json + sae_weights.safetensors.

Checked against sae-lens 6.54 (`SAE.load_from_disk(folder)`, which loads the state dict strictly):
the safetensors file holds exactly W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae],
b_dec [d_in] (+ threshold [d_sae] for jumprelu); cfg.json has architecture, d_in, d_sae, dtype,
device, apply_b_dec_to_input, normalize_activations, reshape_activations, k for topk, and
metadata. metadata must carry sae_lens_version >= 6, or SAELens reads the file as a pre-6 config
and drops hook_name/model_name; SAELens's ActivationsStore.from_sae also needs context_size and
prepend_bos there (our sequences start with BOS, so prepend_bos defaults to True).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from cache_schema.files import atomic_write, file_sha256
from pipeline.errors import PipelineError
from pipeline.run.layout import CFG_FILE, WEIGHTS_FILE
from pipeline.sae.base import SAE
from pipeline.sae.inference import InferenceSAE
from pipeline.sae.registry import inference_class

SAE_LENS_VERSION = "6.0.0"


def save_saelens(folder: str | Path, sae: SAE, scale: float, metadata: dict) -> dict[str, str]:
    """Write the SAE (input scaling folded in) for SAELens; returns {file name: sha256}.

    metadata must name hook_name and model_name; the rest (context_size, cache id, training
    config, ...) is stored as given. sae_lens_version is always ours (6.0.0), so that SAELens
    reads the file as a version-6 config."""
    missing = [key for key in ("hook_name", "model_name") if not metadata.get(key)]
    if missing:
        raise PipelineError(f"save_saelens: metadata lacks {', '.join(missing)}; SAELens and "
                            "SAEBench need them to find the model and hook of the SAE")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, fields = sae.saelens_export(scale)
    cfg = {**fields, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"prepend_bos": True, "trained_arch": sae.cfg.arch, **metadata,
                        "sae_lens_version": SAE_LENS_VERSION}}
    text = json.dumps(cfg, indent=1, default=str)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write(folder / CFG_FILE, lambda tmp: tmp.write_text(text))
    return {name: file_sha256(folder / name) for name in (WEIGHTS_FILE, CFG_FILE)}


def load_saelens(folder: str | Path) -> InferenceSAE:
    """Read a saved SAE (safetensors only, no pickle) with clear errors for what is wrong."""
    folder = Path(folder)
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise PipelineError(f"{folder} is not a saved SAE: {name} is missing")
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
    except ValueError as e:
        raise PipelineError(f"{folder / CFG_FILE} is not valid JSON ({e})") from e
    arch = cfg.get("architecture")
    try:
        kind = inference_class(cfg)
    except PipelineError as e:
        raise PipelineError(f"{folder}: {e}") from None
    needed = ["d_in", "d_sae", *kind.saved_fields]
    missing = [key for key in needed if not isinstance(cfg.get(key), int)]
    if missing:
        raise PipelineError(f"{folder / CFG_FILE}: {', '.join(missing)} missing or not an integer")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", False):
        raise PipelineError(f"{folder / CFG_FILE}: normalize_activations is {norm!r}; this tool reads "
                            "SAEs whose input scaling is folded into the weights ('none')")
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise PipelineError(f"{folder / WEIGHTS_FILE} cannot be read as safetensors ({e})") from e
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,),
              "b_dec": (d_in,), "threshold": (d_sae,)}
    for name in kind.saved_tensors:
        if name not in tensors:
            raise PipelineError(f"{folder / WEIGHTS_FILE} has no tensor {name} (needed by {arch})")
        if tuple(tensors[name].shape) != shapes[name]:
            raise PipelineError(f"{folder / WEIGHTS_FILE}: {name} has shape "
                                f"{tuple(tensors[name].shape)}, cfg.json says {shapes[name]}")
    return InferenceSAE(cfg, {n: tensors[n].float() for n in kind.saved_tensors}, kind)
