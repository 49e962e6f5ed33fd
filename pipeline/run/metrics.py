"""metrics.jsonl: one JSON object per log point, appended during training; and the per-step
reconstruction loss its rows carry, with the rolling variance the plot and the audit draw."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class MetricsLog:
    """Append-only JSON lines; `offset()` is stored in checkpoints so that a resumed run first
    cuts the lines written after its checkpoint (no duplicated or missing steps)."""

    def __init__(self, path: Path, truncate_at: int | None = None):
        self.path = path
        if truncate_at is not None and self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(truncate_at)
        self.file = open(self.path, "a")  # noqa: SIM115 - lives as long as the run

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def offset(self) -> int:
        self.file.flush()
        os.fsync(self.file.fileno())
        return self.path.stat().st_size

    def close(self) -> None:
        self.file.close()


def read_rows(path: Path) -> list[dict]:
    """Every row of a metrics.jsonl ([] when there is none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def per_step_mse(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(step, mse) of every training step, from the per-step history each log row carries."""
    steps, mse = [], []
    for row in rows:
        hist = row.get("step_mse", [])
        steps.extend(range(row["step"] - len(hist) + 1, row["step"] + 1))
        mse.extend(hist)
    return np.asarray(steps), np.asarray(mse, dtype=np.float64)


def rolling_variance(values: np.ndarray, window: int) -> np.ndarray:
    """Variance of each trailing window of `window` values (NaN until the window is full)."""
    out = np.full(len(values), np.nan)
    if len(values) >= window:
        c1 = np.cumsum(np.insert(values, 0, 0.0))
        c2 = np.cumsum(np.insert(values * values, 0, 0.0))
        s1, s2 = c1[window:] - c1[:-window], c2[window:] - c2[:-window]
        out[window - 1:] = np.maximum(s2 / window - (s1 / window) ** 2, 0.0)
    return out
