"""Linear layers with their weights packed once for oneDNN, for forward-bound CPU work (the
absorption eval's prompts). torch's own CPU freezing (inductor) does the same through these ops;
without packing every call re-lays the weight out. A no-op off CPU, outside float32, or where
this torch build lacks the ops."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _pack(linear: torch.nn.Linear, rows_hint: int):
    """A forward for `linear` through oneDNN with a packed copy of its weight."""
    packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
    bias = None if linear.bias is None else linear.bias.detach()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return forward


def packable(model: torch.nn.Module) -> bool:
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "cpu" and p.dtype == torch.float32
            and torch.backends.mkldnn.is_available())


@contextmanager
def packed_linears(model: torch.nn.Module, rows_hint: int = 2048) -> Iterator[bool]:
    """Inside, every nn.Linear of `model` runs through oneDNN with a packed weight (values
    equal to float rounding); yields whether it does. `rows_hint`: typical rows per call."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    forwards = []
    if packable(model):
        try:
            with torch.no_grad():
                forwards = [_pack(m, rows_hint) for m in linears]
                probe = torch.zeros(1, linears[0].in_features) if linears else None
                if probe is not None:
                    forwards[0](probe)  # a build whose ops exist but fail fails here
        except (AttributeError, RuntimeError, NotImplementedError):
            forwards = []
    for m, f in zip(linears, forwards, strict=False):
        m.forward = f
    try:
        yield bool(forwards)
    finally:
        for m in linears[:len(forwards)]:
            del m.forward
