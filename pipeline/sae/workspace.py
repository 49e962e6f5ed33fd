"""Buffers that every training step reuses instead of allocating [batch, d_sae] tensors anew.

On CPU a fresh tensor of that size is a fresh mapping whose pages fault in on first touch, which
costs as much as a pass of real work over it. On CUDA the buffers are simply static, as a
captured graph wants them."""

from __future__ import annotations

import torch


class Workspace:
    """Named buffers, made on first use and remade when the shape, dtype or device changes.
    Not module state: nothing here is saved or loaded."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or \
                buf.device != like.device:
            buf = self._buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf
