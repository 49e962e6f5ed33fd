"""Activation dtype encoding (SPEC.md): how each storage dtype is laid out on disk, and the one
place that turns bfloat16 into uint16 bit patterns and back."""

from __future__ import annotations

import numpy as np

STORAGE = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


def storage_dtype(name: str) -> np.dtype:
    """numpy dtype of the stored activation bytes (bfloat16 is stored as uint16 bit patterns)."""
    return np.dtype(STORAGE[name])


def read_dtype(name: str) -> str:
    """Name of the dtype (numpy and torch alike) a reader holds stored activations in: bfloat16's
    bit patterns as int16, since torch has no full uint16 support, then viewed as bfloat16."""
    return "int16" if name == "bfloat16" else name


def encode(x: np.ndarray, name: str) -> np.ndarray:
    """float activations as stored (bfloat16: the top 16 bits of each float32, truncated)."""
    if name == "bfloat16":
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(storage_dtype(name))


def decode(stored: np.ndarray, name: str) -> np.ndarray:
    """Stored activations as float32."""
    if name == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)
