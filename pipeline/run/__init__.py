"""The run folder's contract (SPEC.md): what `pipeline train` writes and eval, audit, features
and sweep read, all through RunDir. Below the stages, above pipeline.sae (it saves and loads SAEs)."""

from pipeline.run.folder import RunDir, absolute_cache
from pipeline.run.layout import (
    AUDIT_FREQ_PLOT,
    AUDIT_LOSS_PLOT,
    AUDIT_NORMS_PLOT,
    EVAL_FILE,
    FREQ_FILE,
    SWEEP_FILE,
    WORDS_FILE,
    sweep_point_dir,
)
from pipeline.run.metrics import per_step_mse, rolling_variance
from pipeline.run.provenance import check_cache_source, check_sae_fits_cache
from pipeline.run.saelens import load_saelens, save_saelens

__all__ = ["AUDIT_FREQ_PLOT", "AUDIT_LOSS_PLOT", "AUDIT_NORMS_PLOT", "EVAL_FILE", "FREQ_FILE",
           "SWEEP_FILE", "WORDS_FILE", "RunDir", "absolute_cache", "check_cache_source",
           "check_sae_fits_cache", "load_saelens", "per_step_mse", "rolling_variance",
           "save_saelens", "sweep_point_dir"]
