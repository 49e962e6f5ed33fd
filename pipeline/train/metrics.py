"""metrics.jsonl (one JSON object per log point) and the end-of-run training plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

METRICS = "metrics.jsonl"
PLOT = "training.png"


class MetricsLog:
    """Append-only JSON lines; `offset()` is stored in checkpoints so that a resumed run first
    cuts the lines written after its checkpoint (no duplicated or missing steps)."""

    def __init__(self, run_dir: Path, truncate_at: int | None = None):
        self.path = run_dir / METRICS
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


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rolling_variance(values: np.ndarray, window: int) -> np.ndarray:
    """Variance of each trailing window of `window` values (NaN until the window is full)."""
    out = np.full(len(values), np.nan)
    if len(values) >= window:
        c1 = np.cumsum(np.insert(values, 0, 0.0))
        c2 = np.cumsum(np.insert(values * values, 0, 0.0))
        s1, s2 = c1[window:] - c1[:-window], c2[window:] - c2[:-window]
        out[window - 1:] = np.maximum(s2 / window - (s1 / window) ** 2, 0.0)
    return out


def per_step_mse(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(step, mse) of every training step, from the per-step history each log row carries."""
    steps, mse = [], []
    for row in rows:
        hist = row.get("step_mse", [])
        steps.extend(range(row["step"] - len(hist) + 1, row["step"] + 1))
        mse.extend(hist)
    return np.asarray(steps), np.asarray(mse, dtype=np.float64)


def plot_training(run_dir: Path, window: int = 500) -> Path | None:
    """training.png: loss, rolling variance of the reconstruction loss, L0, dead fraction."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib  # slow to import, and only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = np.array([r["step"] for r in rows])
    s_all, mse_all = per_step_mse(rows)
    window = min(window, max(len(mse_all) // 4, 2))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    fig.subplots_adjust(hspace=0.35, wspace=0.25, left=0.07, right=0.98, top=0.92, bottom=0.07)
    panels = [
        (axes[0, 0], step, [r["loss"] for r in rows], "loss", "log"),
        (axes[0, 1], s_all, rolling_variance(mse_all, window),
         f"{window}-step rolling variance of MSE", "log"),
        (axes[1, 0], step, [r["l0"] for r in rows], "L0 (active latents per token)", "linear"),
        (axes[1, 1], step, [100 * r["dead_fraction"] for r in rows], "dead latents (%)", "linear"),
    ]
    for ax, x, y, title, yscale in panels:
        ax.plot(x, y, lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        if yscale == "log" and np.nanmin(np.asarray(y, dtype=float), initial=np.inf) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    out = run_dir / PLOT
    fig.savefig(out, dpi=90)  # constrained layout and higher dpi cost ~0.5 s per plot
    plt.close(fig)
    return out
