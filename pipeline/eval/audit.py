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

from cache_schema.files import file_sha256
from pipeline.errors import PipelineError
from pipeline.eval.provenance import run_config
from pipeline.eval.run import EVAL_FILE, FREQ_FILE
from pipeline.sae.io import WEIGHTS
from pipeline.sae.registry import architecture
from pipeline.train.checkpoint import AUDIT_LOG, STATE_FILE, list_checkpoints
from pipeline.train.metrics import per_step_mse, read_metrics, rolling_variance

WINDOW = 500
FPR_LIMIT = 0.05
"""Our threshold for the checklist's downstream false-positive-rate change (the article gives
none): fail when the probes accept 5 points more negatives on reconstructions."""


def _check(name: str, value, threshold, failed: bool | None, detail: str) -> dict:
    status = "skipped" if failed is None else ("fail" if failed else "pass")
    return {"check": name, "value": value, "threshold": threshold, "status": status,
            "detail": detail}


def verify_audit_log(run_dir: Path) -> list[str]:
    """Files whose bytes no longer match the last SHA-256 the audit log recorded for them."""
    path = run_dir / AUDIT_LOG
    if not path.is_file():
        raise PipelineError(f"{run_dir} has no {AUDIT_LOG}: not a run folder of `pipeline train`")
    last: dict[str, str] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        last[entry["file"]] = entry["sha256"]
    if WEIGHTS not in last:
        raise PipelineError(f"{run_dir}/{WEIGHTS} is not in the audit log: the run did not finish")
    bad = []
    for name, digest in sorted(last.items()):
        file = run_dir / name
        actual = file_sha256(file) if file.is_file() else None
        if actual is not None and actual != digest:
            bad.append(f"{name}: SHA-256 {actual[:16]}... does not match the audit "
                       f"log's {digest[:16]}...")
        elif not file.is_file() and not name.startswith("checkpoints/"):
            bad.append(f"{name}: missing (logged in {AUDIT_LOG})")
    return bad


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
    run_dir = Path(run_dir)
    config_path = run_dir / "train_config.json"
    if not config_path.is_file():
        raise PipelineError(f"{run_dir} has no train_config.json: not a run folder of "
                            "`pipeline train`")
    cfg = run_config(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise PipelineError(f"{run_dir} has no metrics.jsonl rows to audit")
    bad_files = verify_audit_log(run_dir)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise PipelineError(f"{run_dir} has no checkpoint (checkpoints/step_*/{STATE_FILE})")
    try:
        state = load_file(str(checkpoints[-1] / STATE_FILE))
    except Exception as e:  # safetensors raises its own error type
        raise PipelineError(f"checkpoint file {checkpoints[-1] / STATE_FILE} cannot be read "
                            f"({e})") from e
    norms = state["sae.W_dec"].norm(dim=1)
    evaluation = json.loads((run_dir / EVAL_FILE).read_text()) \
        if (run_dir / EVAL_FILE).is_file() else None
    dead = evaluation["dead_fraction"] if evaluation else rows[-1]["dead_fraction"]
    var_check, steps, rv, window = loss_variance_check(rows)
    try:
        kind = architecture(cfg["arch"]).sae
    except ValueError as e:
        raise PipelineError(f"{run_dir}/train_config.json: {e}") from None
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
               "SHA-256 in audit.log"),
        _fpr_check(evaluation),
    ]
    report = {"run": str(run_dir), "arch": cfg["arch"], "steps": rows[-1]["step"],
              "failed": [c["check"] for c in checks if c["status"] == "fail"], "checks": checks}
    report["plots"] = _plots(run_dir, rows, steps, rv, window, norms)
    (run_dir / "audit.json").write_text(json.dumps(report, indent=1))
    (run_dir / "audit.md").write_text(_markdown(report))
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


def _plots(run_dir: Path, rows, steps, rv, window, norms: torch.Tensor) -> list[str]:
    import matplotlib  # slow to import, and only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    a.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    a.set(title="loss", xlabel="step", yscale="log")
    b.plot(steps, rv)
    b.set(title=f"{window}-step rolling variance of MSE", xlabel="step", yscale="log")
    fig.savefig(run_dir / "audit_loss.png", dpi=100)
    plt.close(fig)
    out.append("audit_loss.png")
    fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    ax.hist(norms.numpy(), bins=np.linspace(0.0, max(1.2, 1.05 * float(norms.max())), 61))
    ax.axvline(0.1, color="red", ls="--", label="0.1 threshold")
    ax.set(title="decoder row norms", xlabel="||W_dec_i||", ylabel="latents")
    ax.legend()
    fig.savefig(run_dir / "audit_decoder_norms.png", dpi=100)
    plt.close(fig)
    out.append("audit_decoder_norms.png")
    if (run_dir / FREQ_FILE).is_file():
        freq = load_file(str(run_dir / FREQ_FILE))["freq"].numpy()
        fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
        ax.hist(np.log10(freq[freq > 0]), bins=50)
        ax.set(title=f"latent frequency ({int((freq == 0).sum())} never fire)",
               xlabel="log10 fraction of tokens", ylabel="latents")
        fig.savefig(run_dir / "audit_latent_freq.png", dpi=100)
        plt.close(fig)
        out.append("audit_latent_freq.png")
    return out
