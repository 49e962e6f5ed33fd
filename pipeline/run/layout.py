"""The name of every file in a run folder and of the folders around it; SPEC.md says what each
holds. The one place these names are defined."""

from __future__ import annotations

from pathlib import Path

# written by `pipeline train`
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
SUMMARY_FILE = "summary.json"
AUDIT_LOG = "audit.log"
CHECKPOINTS = "checkpoints"
STATE_FILE, META_FILE = "state.safetensors", "state.json"
# the SAELens folder (also a bare saved SAE outside any run)
WEIGHTS_FILE, CFG_FILE = "sae_weights.safetensors", "cfg.json"
# written by `pipeline eval`
EVAL_FILE, FREQ_FILE, WORDS_FILE = "eval.json", "latent_freq.safetensors", "absorption_words.json"
# written by `pipeline audit`
AUDIT_JSON, AUDIT_MD = "audit.json", "audit.md"
AUDIT_LOSS_PLOT, AUDIT_NORMS_PLOT = "audit_loss.png", "audit_decoder_norms.png"
AUDIT_FREQ_PLOT = "audit_latent_freq.png"
# the default site folder of `pipeline features`
FEATURES_DIR = "features"
# the folder of `pipeline sweep`: this listing beside one run folder per grid point
SWEEP_FILE = "sweep.json"


STEP_PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    """checkpoints/<this>/: the step, zero-padded so that names sort as steps do."""
    return f"{STEP_PREFIX}{step:08d}"


def checkpoint_step(name: str) -> int:
    """The step of a checkpoint_name()."""
    return int(name.removeprefix(STEP_PREFIX))


def sweep_point_dir(root: Path, index: int, point: dict) -> Path:
    """The run folder of grid point `index` (0-based) of a sweep whose folder is `root`."""
    label = "-".join(f"{n}={v}" for n, v in point.items()).replace("/", "_")
    return Path(root) / f"{index:02d}-{label}"
