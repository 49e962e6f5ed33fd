"""The `pipeline` command."""

from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path

import typer

from cache_schema import CacheError
from pipeline.errors import PipelineError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Extract activation caches and train masked sparse autoencoders on them.")


def friendly_errors(fn):
    """Turn expected failures into a one-paragraph message and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (PipelineError, CacheError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _extract(cfg, progress: bool = True) -> None:
    """Write clean and masked resid_post activations of a causal LM to a Zarr cache."""
    from pipeline.extract.run import extract as run_extract

    m = run_extract(cfg, progress=progress)
    typer.echo(f"cache {m.cache_id} {m.status}: {m.n_tokens} tokens x {len(m.hooks)} hook(s) "
               f"x 2 streams at {cfg.out}")


def _register_extract() -> None:
    from pipeline.extract.config import ExtractConfig
    from pipeline.options import command_from_dataclass

    progress = inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                 default=typer.Option(True, help="Show a progress bar."))
    command = command_from_dataclass(ExtractConfig, _extract, skip=("write",),
                                     short={"out": "-o", "layers": "-l"},
                                     flags={"layers": "layer"}, extra=(progress,))
    app.command(name="extract")(friendly_errors(command))


_register_extract()


def _plan(cfg, *, tflops: float | None = None, arch: str = "topk", d_sae: int | None = None,
          expansion: int = 8, train_batch_size: int = 4096, json_out: bool = False) -> None:
    """Size an extraction and an SAE training run from the model's config alone (no weights):
    cache bytes, device and host memory, time at a FLOP rate, SAE training memory."""
    from pipeline.plan.report import format_plan, make_plan

    plan = make_plan(cfg, tflops, arch, d_sae, expansion, train_batch_size)
    typer.echo(json.dumps(plan, indent=1) if json_out else format_plan(plan))


def _register_plan() -> None:
    from pipeline.extract.config import ExtractConfig
    from pipeline.options import command_from_dataclass
    from pipeline.sae.registry import ARCHITECTURES

    def opt(name, hint, default, help_, *flags):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=hint,
                                 default=typer.Option(default, *flags, help=help_))

    extra = (
        opt("tflops", float | None, None, "FLOP rate (TFLOP/s) to quote the extraction time at "
            "(default: a dense matmul measured on this machine)."),
        opt("arch", str, "topk", f"SAE architecture: {', '.join(ARCHITECTURES)}."),
        opt("d_sae", int | None, None, "Number of latents (default: expansion x d_model)."),
        opt("expansion", int, 8, "d_sae = expansion x d_model, unless --d-sae is given."),
        opt("train_batch_size", int, 4096, "SAE training batch size."),
        opt("json_out", bool, False, "Print the plan as JSON.", "--json"),
    )
    command = command_from_dataclass(
        ExtractConfig, _plan, skip=("corpus", "revision", "mask_rate", "mask_strategy",
                                    "mask_token", "seed", "codec", "device_map", "overwrite",
                                    "force", "trust_remote_code", "write"),
        short={"out": "-o", "layers": "-l"}, flags={"layers": "layer"}, extra=extra,
        helps={"model": "A preset (llama-3-8b, llama-3.1-8b, llama-3-70b, mistral-7b, "
                        "smollm2-135m), 'default', an HF model folder (only its config.json is "
                        "read) or a .gguf file.",
               "out": "Where the cache would go: its filesystem's free space is checked.",
               "device": "Device extraction would run on (auto: cuda): sets the compute dtype "
                         "'auto' means."})
    app.command(name="plan")(friendly_errors(command))


_register_plan()


@app.command("inspect")
@friendly_errors
def inspect_(cache: str = typer.Argument(..., help="Cache folder or URL.")) -> None:
    """Show a cache's manifest, sizes, status and per-layer norm statistics."""
    from pipeline.describe import describe
    from pipeline.remote import local_cache

    typer.echo(describe(local_cache(cache)))


@app.command()
@friendly_errors
def verify(cache: str = typer.Argument(..., help="Cache folder or URL.")) -> None:
    """Check every chunk file against its SHA-256; exit 1 naming each bad chunk."""
    from pipeline.remote import verify_any

    m, problems = verify_any(cache)
    if problems:
        for p in problems:
            typer.echo(f"BAD {p}", err=True)
        typer.echo(f"cache {m.cache_id}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"cache {m.cache_id} ({m.status}): all {m.n_chunks} chunks match their checksums")


def _eval(cfg) -> None:
    """Evaluate a saved SAE: MSE, FVE, L0, dead/dense latents, spliced CE, absorption."""
    from pipeline.eval.run import evaluate

    typer.echo(json.dumps(evaluate(cfg), indent=1))


def _register_eval() -> None:
    from pipeline.eval.config import EvalConfig
    from pipeline.options import command_from_dataclass

    command = command_from_dataclass(EvalConfig, _eval, arguments=("sae_dir",))
    app.command(name="eval")(friendly_errors(command))


_register_eval()


@app.command()
@friendly_errors
def audit(run_dir: Path = typer.Argument(..., help="Run folder of `pipeline train`.")) -> None:
    """The article's checklist from a run's files: audit.json, audit.md, plots; exit 1 on a fail."""
    from pipeline.eval.audit import run_audit

    report = run_audit(run_dir)
    for c in report["checks"]:
        value = "" if c["value"] is None else c["value"]
        typer.echo(f"{c['status']:>7}  {c['check']:<32} {value!s:<24} {c['detail']}")
    typer.echo(f"report: {run_dir}/audit.md")
    if report["failed"]:
        typer.echo(f"audit failed: {', '.join(report['failed'])}", err=True)
        raise typer.Exit(1)


def _features(cfg) -> None:
    """Browse a saved SAE's latents offline: top examples, frequency, histogram, logit effects."""
    from pipeline.features.run import features

    typer.echo(f"open {features(cfg).resolve()}")


def _register_features() -> None:
    from pipeline.features.config import FeaturesConfig
    from pipeline.options import command_from_dataclass

    command = command_from_dataclass(FeaturesConfig, _features, arguments=("sae_dir",),
                                     short={"out": "-o"})
    app.command(name="features")(friendly_errors(command))


_register_features()


def _train(cfg) -> None:
    """Train a sparse autoencoder on one layer and stream of a cache (SAELens folder format out)."""
    from pipeline.train.trainer import train as run_train

    summary = run_train(cfg)
    if summary:  # {} on the processes of a launch other than rank 0
        typer.echo(json.dumps(summary, indent=1))


def _register_train() -> None:
    from pipeline.options import command_from_dataclass
    from pipeline.sae.registry import settings
    from pipeline.train.config import TrainConfig

    command = command_from_dataclass(TrainConfig, _train, short={"out": "-o", "layer": "-l"},
                                     nested={"sae": settings()})
    app.command(name="train")(friendly_errors(command))



def _sweep(cfg, grid: str | None = None, set_: list[str] | None = None) -> None:
    """Train a grid of SAEs from one read of the cache, each batch fed to every SAE."""
    from pipeline.train.sweep import sweep

    summaries = sweep(cfg, grid, set_)
    if summaries:  # [] on the processes of a launch other than rank 0, which prints them all
        typer.echo(json.dumps([{k: s.get(k) for k in ("run", "arch", "d_sae", "steps",
                                                      "holdout")} for s in summaries], indent=1))


def _register_sweep() -> None:
    from pipeline.options import command_from_dataclass
    from pipeline.sae.registry import settings
    from pipeline.train.config import TrainConfig

    extra = (
        inspect.Parameter("grid", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                          default=typer.Option(None, help="JSON or TOML file: {\"grid\": {name: "
                                               "values}, other keys set every run}.")),
        inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, annotation=list[str],
                          default=typer.Option([], "--set", help="name=v1,v2: one grid axis "
                                               "(repeat for more).")),
    )
    command = command_from_dataclass(TrainConfig, _sweep, short={"out": "-o", "layer": "-l"},
                                     extra=extra, nested={"sae": settings()})
    app.command(name="sweep")(friendly_errors(command))


_register_train()
_register_sweep()


def main() -> None:  # pragma: no cover
    app(prog_name="pipeline")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
