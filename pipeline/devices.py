"""Device names as users give them."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device {device} was asked for but CUDA is not available here: "
                            "use --device cpu")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise PipelineError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N")
    return device
