"""`pipeline audit RUN_DIR`: the source article's checklist, computed from the run's own files.

Checks (METHOD.md): dead latents > 5% of d_sae; the 500-step rolling variance of the
reconstruction loss up > 5% from its post-convergence baseline (taken at the half-way step);
l1 coefficient above 1e-3 (architectures trained with l1); min decoder row norm < 0.1; mask density
> 10% (masked); every file in audit.log still matching its SHA-256 and the weights in
safetensors; the downstream false-positive-rate change of the first-letter probes when they read
the SAE's reconstruction (from `pipeline eval --absorption`; skipped without it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.errors import PipelineError
from pipeline.run import (
    AUDIT_FREQ_PLOT,
    AUDIT_LOSS_PLOT,
    AUDIT_NORMS_PLOT,
    RunDir,
    per_step_mse,
    rolling_variance,
)
from pipeline.sae.registry import architecture

WINDOW = 500
FPR_LIMIT = 0.05
"""Our threshold for the checklist's downstream false-positive-rate change (the article gives
none): fail when the probes accept 5 points more negatives on reconstructions."""


def _check(name: str, value, threshold, failed: bool | None, detail: str) -> dict:
    status = "skipped" if failed is None else ("fail" if failed else "pass")
    return {"check": name, "value": value, "threshold": threshold, "status": status,
            "detail": detail}


def loss_variance_check(rows: list[dict]) -> tuple[dict, np.ndarray, np.ndarray, int]:
    steps, mse = per_step_mse(rows)
    window = min(WINDOW, max(len(mse) // 4, 2))
    rv = rolling_variance(mse, window)
    half, end = len(rv) // 2, len(rv) - 1
    if len(rv) < 2 * window or not np.isfinite(rv[half]) or rv[half] <= 0:
        return (_check("loss_variance_increase", None, 0.05, None,
                       f"needs at least {2 * window} logged steps"), steps, rv, window)
    change = float(rv[end] / rv[half] - 1.0)
    return (_check("loss_variance_increase", change, 0.05, change > 0.05,
                   f"{window}-step rolling variance of the MSE: {rv[half]:.3g} at step "
                   f"{steps[half]} (baseline) -> {rv[end]:.3g} at step {steps[end]}"),
            steps, rv, window)


def run_audit(run_dir: str | Path) -> dict:
    """Compute the checklist; write audit.json, audit.md and the plots; return the report."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise PipelineError(f"{run} has no {run.config.name}: not a run folder of "
                            "`pipeline train`")
    cfg = run.read_config()
    rows = run.read_metrics()
    if not rows:
        raise PipelineError(f"{run} has no {run.metrics.name} rows to audit")
    bad_files = run.unmatched_files()
    checkpoints = run.checkpoints()
    if not checkpoints:
        raise PipelineError(f"{run} has no checkpoint in {run.checkpoints_dir}")
    norms = run.checkpoint_state(checkpoints[-1])["sae.W_dec"].norm(dim=1)
    evaluation = json.loads(run.eval_json.read_text()) if run.eval_json.is_file() else None
    dead = evaluation["dead_fraction"] if evaluation else rows[-1]["dead_fraction"]
    var_check, steps, rv, window = loss_variance_check(rows)
    try:
        kind = architecture(cfg["arch"]).sae
    except ValueError as e:
        raise PipelineError(f"{run.config}: {e}") from None
    l1_applies = kind.uses_l1
    checks = [
        _check("dead_latents", dead, 0.05, dead > 0.05,
               "fraction of latents that never fired on the held-out tokens (pipeline eval)"
               if evaluation else f"fraction not fired in {cfg['dead_tokens']} training tokens"),
        var_check,
        _check("l1_coefficient", cfg["l1"], 1e-3, cfg["l1"] > 1e-3 if l1_applies else None,
               "the article's l1 ceiling (mean-|z| convention)" if l1_applies
               else f"{cfg['arch']} is not trained with an l1 penalty"),
        _check("min_decoder_norm", float(norms.min()), 0.1, float(norms.min()) < 0.1,
               f"over the {norms.numel()} decoder rows of {checkpoints[-1].name} (training "
               "space)"),
        _check("mask_density", rows[-1]["mask_density"], 0.1,
               rows[-1]["mask_density"] > 0.1 if kind.has_mask else None,
               "fraction of latents under the dormancy mask" if kind.has_mask
               else "no dormancy mask in this architecture"),
        _check("checkpoint_integrity", len(bad_files), 0, bool(bad_files),
               "; ".join(bad_files) or "weights and checkpoints are safetensors and match the "
               f"SHA-256 in {run.audit_log.name}"),
        _fpr_check(evaluation),
    ]
    report = {"run": str(run), "arch": cfg["arch"], "steps": rows[-1]["step"],
              "failed": [c["check"] for c in checks if c["status"] == "fail"], "checks": checks}
    report["plots"] = _plots(run, rows, steps, rv, window, norms)
    run.audit_json.write_text(json.dumps(report, indent=1))
    run.audit_md.write_text(_markdown(report))
    return report


def _fpr_check(evaluation: dict | None) -> dict:
    change = (evaluation or {}).get("absorption", {}).get("downstream_fpr_change")
    if change is None:
        return _check("downstream_false_positive_rate", None, FPR_LIMIT, None,
                      "not computed: run `pipeline eval --absorption` first")
    return _check("downstream_false_positive_rate", change, FPR_LIMIT, change > FPR_LIMIT,
                  "mean change in the first-letter probes' false-positive rate when they read "
                  "the SAE's reconstruction instead of the residual stream")


def _markdown(report: dict) -> str:
    lines = [f"# Audit of {report['run']} ({report['arch']}, {report['steps']} steps)", "",
             "| check | value | threshold | status | detail |", "|---|---|---|---|---|"]
    for c in report["checks"]:
        value = "" if c["value"] is None else (f"{c['value']:.4g}"
                                               if isinstance(c["value"], float) else c["value"])
        threshold = "" if c["threshold"] is None else c["threshold"]
        lines.append(f"| {c['check']} | {value} | {threshold} | **{c['status']}** | "
                     f"{c['detail']} |")
    verdict = ("FAILED: " + ", ".join(report["failed"])) if report["failed"] else "all checks pass"
    lines += ["", verdict, ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def _plots(run: RunDir, rows, steps, rv, window, norms: torch.Tensor) -> list[str]:
    import matplotlib  # slow to import, and only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    a.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    a.set(title="loss", xlabel="step", yscale="log")
    b.plot(steps, rv)
    b.set(title=f"{window}-step rolling variance of MSE", xlabel="step", yscale="log")
    fig.savefig(run.path / AUDIT_LOSS_PLOT, dpi=100)
    plt.close(fig)
    out.append(AUDIT_LOSS_PLOT)
    fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    ax.hist(norms.numpy(), bins=np.linspace(0.0, max(1.2, 1.05 * float(norms.max())), 61))
    ax.axvline(0.1, color="red", ls="--", label="0.1 threshold")
    ax.set(title="decoder row norms", xlabel="||W_dec_i||", ylabel="latents")
    ax.legend()
    fig.savefig(run.path / AUDIT_NORMS_PLOT, dpi=100)
    plt.close(fig)
    out.append(AUDIT_NORMS_PLOT)
    if run.latent_freq.is_file():
        freq = load_file(str(run.latent_freq))["freq"].numpy()
        fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
        ax.hist(np.log10(freq[freq > 0]), bins=50)
        ax.set(title=f"latent frequency ({int((freq == 0).sum())} never fire)",
               xlabel="log10 fraction of tokens", ylabel="latents")
        fig.savefig(run.path / AUDIT_FREQ_PLOT, dpi=100)
        plt.close(fig)
        out.append(AUDIT_FREQ_PLOT)
    return out
