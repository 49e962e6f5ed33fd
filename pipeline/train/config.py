"""TrainConfig: the settings of `pipeline train`; the CLI options are generated from these fields
and the config is saved beside every run (train_config.json)."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

from pipeline.data.loader import STREAMS
from pipeline.errors import PipelineError
from pipeline.sae import ARCHITECTURES, SAEConfig, sae_config
from pipeline.sae.registry import settings

CUDA_GRAPH = ("auto", "on", "off")


@dataclass
class TrainConfig:
    cache: str
    """Cache folder written by `pipeline extract`."""
    out: str = "runs/demo"
    """Run folder: SAE weights, cfg.json, metrics, plots, checkpoints."""
    layer: int | None = None
    """Layer of the cache to train on; default: the cache's only (or first) layer."""
    stream: str = "clean"
    """clean, masked, or mix (whole chunks from either stream)."""
    mix_fraction: float = 0.5
    """With --stream mix: fraction of chunks taken from the masked stream."""
    arch: str = "relu"
    """SAE architecture: relu, masked, gated, topk, batchtopk."""
    expansion: int = 8
    """d_sae = expansion * d_model, unless --d-sae is given."""
    d_sae: int | None = None
    """Number of latents (overrides --expansion)."""
    sae: dict = dataclasses.field(default_factory=dict)
    """Architecture settings by name: each architecture's config class defines its own (with
    their help and defaults), shown on the command line as flat flags (--k, --l1, ...)."""
    batch_size: int = 4096
    """Tokens per step."""
    lr: float = 2e-4
    """Adam learning rate after warm-up."""
    lr_warmup_steps: int = 100
    """Steps of linear learning-rate warm-up from 0."""
    lr_decay_fraction: float = 0.2
    """Final fraction of the steps over which the learning rate decays linearly to 0."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm at this value (0 disables)."""
    tokens: int | None = None
    """Training tokens; steps = tokens // batch_size (default: one epoch of the cache)."""
    steps: int | None = None
    """Training steps (instead of --tokens)."""
    seed: int = 0
    """Seed of the SAE initialisation and of the data order."""
    normalize: bool = True
    """Scale inputs so that E||x|| = sqrt(d_model) (folded back into the saved weights)."""
    keep_special: bool = False
    """Keep BOS and other special-token positions (outlier norms) in training batches."""
    holdout_chunks: int = 0
    """Leave the cache's last N chunks out of training; evaluated at the end."""
    window_chunks: int = 4
    """Chunks shuffled together in memory (the shuffle window)."""
    log_every: int = 50
    """Write metrics every N steps (the only host syncs of the training loop)."""
    checkpoint_every: int = 500
    """Save the full training state every N steps (a multiple of --log-every)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    cuda_graph: str = "auto"
    """auto (on for CUDA), on, or off: capture the whole step in a CUDA graph."""
    tf32: bool = False
    """Let float32 matmuls on CUDA use TF32 tensor cores: several times faster, about 1e-3
    relative precision per product (scripts/bench_train.py reports both)."""
    resume: bool = False
    """Continue the run in --out from its last checkpoint."""
    progress: bool = True
    """Show a progress bar."""

    # Settings that may change between a run and its resumption.
    RESUMABLE = ("resume", "progress")

    def __post_init__(self) -> None:
        known = {s.name: s.default for s in settings()}
        unknown = sorted(set(self.sae) - set(known)) if isinstance(self.sae, dict) else []
        if unknown or not isinstance(self.sae, dict):
            raise PipelineError(f"unknown SAE settings {unknown or self.sae!r} (known: "
                                f"{', '.join(known)})")
        self.sae = {**known, **self.sae}
        problems = _type_problems(self)
        if problems:  # ranges cannot be checked on values of the wrong type
            raise PipelineError("; ".join(problems) + ".")
        if self.stream not in STREAMS:
            problems.append(f"unknown stream {self.stream!r} (expected one of {STREAMS})")
        if self.arch not in ARCHITECTURES:
            problems.append(f"unknown architecture {self.arch!r} (expected one of "
                            f"{sorted(ARCHITECTURES)})")
        if self.cuda_graph not in CUDA_GRAPH:
            problems.append(f"--cuda-graph must be one of {CUDA_GRAPH}, got {self.cuda_graph!r}")
        problems += _range_problems(self)
        if self.checkpoint_every >= 1 and self.log_every >= 1 and \
                self.checkpoint_every % self.log_every:
            problems.append(f"--checkpoint-every ({self.checkpoint_every}) must be a multiple of "
                            f"--log-every ({self.log_every})")
        if self.tokens is not None and self.steps is not None:
            problems.append("give --tokens or --steps, not both")
        if self.tokens is not None and self.tokens < self.batch_size:
            problems.append(f"--tokens {self.tokens} is below one batch ({self.batch_size})")
        if problems:
            raise PipelineError("; ".join(problems) + ".")

    def sae_config(self, d_in: int) -> SAEConfig:
        """The SAE's own settings, with d_sae resolved."""
        d_sae = self.d_sae if self.d_sae is not None else self.expansion * d_in
        try:
            return sae_config(self.arch, d_in, d_sae, **self.sae)
        except ValueError as e:
            raise PipelineError(str(e)) from e

    @classmethod
    def from_flat(cls, **values) -> TrainConfig:
        """From flat settings, as the CLI, grid files and train_config.json name them."""
        names = {s.name for s in settings()}
        sae = {k: v for k, v in values.items() if k in names}
        return cls(**{k: v for k, v in values.items() if k not in names},
                   sae={**values.get("sae", {}), **sae})

    def to_dict(self) -> dict:
        """Flat settings, the SAE's in the place of `sae` (train_config.json's layout)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "sae":
                out.update(self.sae)
            else:
                out[f.name] = getattr(self, f.name)
        return out

    def get(self, name: str):
        """A flat setting by name (an SAE setting or a field)."""
        return self.sae[name] if name in self.sae else getattr(self, name)

    def identity(self) -> dict:
        """The settings that must match for --resume."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RESUMABLE}


# Architectures whose batch statistic is reduced over processes in their k-sparse step only:
# the dense reference (--no-sparse) selects BatchTopK's k x batch largest on one process's rows.
SPARSE_ONLY_DATA_PARALLEL = ("batchtopk",)


def check_data_parallel(cfg: TrainConfig, world: int) -> None:
    """Refuse a data-parallel run that cannot equal a single process's run on the same batches."""
    if cfg.batch_size % world:
        raise PipelineError(f"--batch-size {cfg.batch_size} is not divisible by the {world} "
                            "processes of this launch: each takes an equal slice of every batch; "
                            f"pass a multiple of {world}, or launch a divisor of {cfg.batch_size}")
    if cfg.arch in SPARSE_ONLY_DATA_PARALLEL and not cfg.sae.get("sparse", True):
        raise PipelineError(f"--arch {cfg.arch} --no-sparse cannot train data-parallel (the "
                            "dense reference takes its batch-wide top-k on one process's rows): "
                            "drop --no-sparse, or run a single process")


# The accepted range of every numeric setting: (lowest, highest, highest included); None = open.
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "layer": (0, None, True), "mix_fraction": (0, 1, True), "expansion": (1, None, True),
    "d_sae": (1, None, True), "batch_size": (1, None, True), "lr_warmup_steps": (0, None, True),
    "lr_decay_fraction": (0, 1, True), "beta1": (0, 1, False), "beta2": (0, 1, False),
    "grad_clip": (0, None, True), "tokens": (1, None, True), "steps": (1, None, True),
    "seed": (0, None, True), "holdout_chunks": (0, None, True), "window_chunks": (1, None, True),
    "log_every": (1, None, True), "checkpoint_every": (1, None, True),
}


def flat_hints() -> dict[str, type]:
    """The type of every flat setting (TrainConfig's fields with the SAE's in place of `sae`)."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for name, hint in hints.items():
        if name == "sae":
            out.update({s.name: s.hint for s in settings()})
        else:
            out[name] = hint
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_problems(cfg: TrainConfig) -> list[str]:
    """Values of the wrong type (a grid file or a Python caller can pass anything)."""
    problems = []
    for name, hint in flat_hints().items():
        value = cfg.get(name)
        kinds = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
        if value is None and type(None) in typing.get_args(hint):
            continue
        kind = kinds[0]
        ok = (isinstance(value, bool) if kind is bool
              else isinstance(value, int | float) and not isinstance(value, bool) if kind is float
              else isinstance(value, int) and not isinstance(value, bool) if kind is int
              else isinstance(value, kind))
        if not ok:
            problems.append(f"{_flag(name)} must be {_KIND_NAMES[kind]}, got {value!r}")
    return problems


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _range_problems(cfg: TrainConfig) -> list[str]:
    """Numbers that are not finite or outside their range, each naming its flag."""
    problems = []
    ranges = {**RANGES, **{s.name: s.limits for s in settings() if s.limits}}
    for name, (lo, hi, hi_included) in ranges.items():
        value = cfg.get(name)
        if value is None:
            continue
        if not math.isfinite(value):
            problems.append(f"{_flag(name)} must be a finite number, got {value}")
        elif (lo is not None and value < lo) or (
                hi is not None and (value > hi or (value == hi and not hi_included))):
            upper = "" if hi is None else f" and {'at most' if hi_included else 'below'} {hi}"
            problems.append(f"{_flag(name)} must be at least {lo}{upper}, got {value}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        problems.append(f"--lr must be a positive finite number, got {cfg.lr}")
    return problems
