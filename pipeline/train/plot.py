"""training.png, drawn at the end of a run from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.run import RunDir, per_step_mse, rolling_variance


def plot_training(run: RunDir, window: int = 500) -> Path | None:
    """training.png: loss, rolling variance of the reconstruction loss, L0, dead fraction."""
    rows = run.read_metrics()
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
    fig.suptitle(run.path.name)
    out = run.plot
    fig.savefig(out, dpi=90)  # constrained layout and higher dpi cost ~0.5 s per plot
    plt.close(fig)
    return out
