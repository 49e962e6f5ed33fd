"""The training state a checkpoint holds beside the SAE's and the step's tensors: the random
number generators' state, and the entries a resume needs (pipeline.run writes and checks them)."""

from __future__ import annotations

import torch


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def expected_entries(sae: torch.nn.Module, step) -> set[str]:
    """The tensor entries a checkpoint of this SAE and TrainStep must hold (Adam's moments
    appear only once a step has run, so they are not required)."""
    return ({f"sae.{k}" for k in sae.state_dict()} | {"rng.cpu"}
            | {f"train.{k}" for k in step.state_tensors() if not k.startswith("adam.")})
