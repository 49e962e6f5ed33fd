"""Every command, given bad input, exits 2 with one paragraph on stderr (no traceback) before any
side effect: no file anywhere changes, the command's own output folder included.

A case is a command line whose `{name}` placeholders are filled from PLACES (fixtures are built
only when a case names them) plus an optional `setup(tmp, places)` that writes its inputs first.
To add one, append a Case to the table of its command."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cache_schema.lock import WriterLock
from cache_schema.synthetic import write_synthetic_cache
from pipeline.cli import app
from pipeline.train.config import TrainConfig
from pipeline.train.trainer import train


@dataclass
class Case:
    id: str
    argv: str
    """The command line, split on spaces, after its placeholders are filled."""
    needle: str
    """Text the error must contain."""
    setup: Callable[[Path, dict[str, str]], None] | None = None
    """Writes the case's inputs under the test's tmp folder (given the filled placeholders)
    before the snapshot."""
    needs: tuple[str, ...] = ()
    """Placeholders the setup uses that the command line does not name."""
    usage: bool = False
    """typer's own usage error (a `Usage:` line and a boxed message) rather than ours."""


def _file(path: str, text: str = "x") -> Callable[[Path, dict], None]:
    def setup(tmp: Path, places: dict) -> None:
        (tmp / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp / path).write_text(text)
    return setup


def _parquet(path: str, columns: dict) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, places: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), tmp / path)
    return setup


def _gz_cut(path: str) -> Callable[[Path, dict], None]:
    """A gzip file cut short, as an interrupted download leaves it."""
    def setup(tmp: Path, places: dict) -> None:
        words = random.Random(0).choices(["state", "union", "trade", "peace", "law"], k=150)
        data = gzip.compress("".join(f'{{"text": "{w} of the people"}}\n' for w in words).encode())
        (tmp / path).write_bytes(data[: len(data) // 2])  # cut before the token budget
    return setup


_HELD: list[WriterLock] = []  # locks held for a case, as a running extract job holds its own


def _folder(path: str) -> Callable[[Path, dict], None]:
    return lambda tmp, places: (tmp / path).mkdir(parents=True)


def _run_copy(edit: Callable[[Path], None]) -> Callable[[Path, dict], None]:
    """Copy the trained run to tmp/runcopy and edit it (use with needs=("run",))."""
    def setup(tmp: Path, places: dict) -> None:
        shutil.copytree(places["run"], tmp / "runcopy")
        edit(tmp / "runcopy")
    return setup


TRAIN = "train --cache {syn} -o {out} --device cpu --no-progress --steps 4 --batch-size 32"
SWEEP = ("sweep --cache {syn} -o {out} --device cpu --no-progress --steps 4 --batch-size 32 "
         "--log-every 2 --checkpoint-every 2")
EXTRACT = ("extract --out {out} --model {model} --corpus {corpus} --layer 1 --tokens 512 "
           "--context-length 32 --rows-per-chunk 256 --no-progress --device cpu")
EVAL = "eval {run} --ce-sequences 0 --device cpu --no-progress"
FEATURES = "features {run} --device cpu --no-progress"

CASES = [
    # extract, inspect, verify: the errors handled before issue 15
    Case("extract-missing-model", EXTRACT.replace("{model}", "{tmp}/nope"), "nope"),
    Case("extract-layer-out-of-range", EXTRACT + " --layer 99", "99"),
    Case("extract-empty-corpus", EXTRACT.replace("{corpus}", "{tmp}/empty"), "empty",
         setup=_folder("empty")),
    Case("extract-budget-below-a-chunk", EXTRACT + " --tokens 10", "--tokens"),
    Case("extract-more-than-the-disk-holds", EXTRACT + " --tokens 1e18", "--force"),
    Case("extract-tokens-not-a-count", EXTRACT + " --tokens 1.5", "whole number", usage=True),
    Case("extract-unknown-dtype", EXTRACT + " --dtype float8", "float8"),
    Case("extract-unknown-codec", EXTRACT + " --codec lzma", "lzma"),
    Case("extract-unknown-mask-strategy", EXTRACT + " --mask-strategy nope", "nope"),
    Case("extract-mask-rate-above-1", EXTRACT + " --mask-rate 1.5", "mask rate"),
    Case("extract-unwritable-out", EXTRACT.replace("{out}", "{tmp}/file/cache"), "cannot write",
         setup=_file("file")),
    Case("extract-non-cache-folder-overwrite", EXTRACT + " --overwrite", "not a cache",
         setup=_file("out/notes.txt")),
    Case("extract-other-settings-on-a-cache",
         "extract --out {tiny} --model {model} --corpus {corpus} --layer 1 --layer 2 --tokens 1024 "
         "--context-length 32 --rows-per-chunk 256 --batch-size 4 --seed 7 --device cpu "
         "--no-progress", "different settings"),
    Case("extract-tokens-not-a-number", EXTRACT + " --tokens many", "--tokens", usage=True),
    # extract: issue 15
    Case("extract-garbage-gguf", EXTRACT.replace("{model}", "{tmp}/m.gguf"), "m.gguf",
         setup=_file("m.gguf", "not a gguf file at all")),
    Case("extract-negative-seed", EXTRACT + " --seed -1", "seed"),
    Case("extract-context-beyond-positions",
         EXTRACT.replace("--tokens 512 --context-length 32 --rows-per-chunk 256",
                         "--tokens 1024 --context-length 1024 --rows-per-chunk 1024"), "1024"),
    Case("extract-folder-held-by-another-writer", EXTRACT, "another `pipeline extract` job",
         setup=lambda tmp, places: _HELD.append(WriterLock(tmp / "out").acquire())),
    # extract: corpora of issue 18 (each once read as text into a cache of garbage, exit 0)
    Case("extract-corpus-unknown-file-type", EXTRACT.replace("{corpus}", "{tmp}/c.bin"),
         "unknown file type", setup=_file("c.bin", "\x00\x01 binary bytes " * 400)),
    Case("extract-corpus-corrupt-parquet", EXTRACT.replace("{corpus}", "{tmp}/c.parquet"),
         "c.parquet", setup=_file("c.parquet", "not a parquet file " * 400)),
    Case("extract-corpus-corrupt-gz", EXTRACT.replace("{corpus}", "{tmp}/c.jsonl.gz"),
         "c.jsonl.gz", setup=_file("c.jsonl.gz", "not gzip data " * 400)),
    Case("extract-corpus-truncated-gz", EXTRACT.replace("{corpus}", "{tmp}/c.jsonl.gz"),
         "c.jsonl.gz", setup=_gz_cut("c.jsonl.gz")),
    Case("extract-corpus-corrupt-zst", EXTRACT.replace("{corpus}", "{tmp}/c.jsonl.zst"),
         "c.jsonl.zst", setup=_file("c.jsonl.zst", "not zstd data " * 400)),
    Case("extract-parquet-without-text-column", EXTRACT.replace("{corpus}", "{tmp}/c.parquet"),
         "--text-column", setup=_parquet("c.parquet", {"body": ["some words"] * 4})),
    Case("extract-pretokenized-id-beyond-vocab", EXTRACT.replace("{corpus}", "{tmp}/c.parquet"),
         "vocabulary", setup=_parquet("c.parquet", {"input_ids": [[1, 5, 7] * 20, [1, 9, 100000] * 20]})),
    Case("extract-npy-id-beyond-vocab", EXTRACT.replace("{corpus}", "{tmp}/c.npy"), "vocabulary",
         setup=lambda tmp, places: np.save(tmp / "c.npy", np.arange(2000, dtype=np.int64))),
    Case("extract-npy-not-integers", EXTRACT.replace("{corpus}", "{tmp}/c.npy"), "integer",
         setup=lambda tmp, places: np.save(tmp / "c.npy", np.ones(2000))),
    Case("extract-pretokenized-row-shorter-than-context",
         EXTRACT.replace("{corpus}", "{tmp}/c.parquet"), "--context-length",
         setup=_parquet("c.parquet", {"tokens": [[5, 6, 7]] * 40})),
    Case("extract-datasets-dict-folder", EXTRACT.replace("{corpus}", "{tmp}/dd"), "dd/train",
         setup=_file("dd/dataset_dict.json", '{"splits": ["train", "test"]}')),
    Case("inspect-missing-cache", "inspect {tmp}/nope", "nope"),
    Case("inspect-not-a-cache", "inspect {tmp}/empty", "empty", setup=_folder("empty")),
    Case("verify-missing-cache", "verify {tmp}/nope", "nope"),
    Case("unknown-command", "nope", "nope", usage=True),

    # train
    Case("train-missing-cache", TRAIN.replace("{syn}", "{tmp}/nope"), "nope"),
    Case("train-layer-not-in-cache", TRAIN + " --layer 5", "layer 5"),
    Case("train-unknown-arch", TRAIN + " --arch nope", "unknown architecture"),
    Case("train-unknown-stream", TRAIN + " --stream nope", "unknown stream"),
    Case("train-lr-nan", TRAIN + " --lr nan", "--lr"),
    Case("train-lr-inf", TRAIN + " --lr inf", "--lr"),
    Case("train-lr-zero", TRAIN + " --lr 0", "--lr"),
    Case("train-lr-not-a-number", TRAIN + " --lr abc", "--lr", usage=True),
    Case("train-grad-clip-nan", TRAIN + " --grad-clip nan", "--grad-clip"),
    Case("train-l1-nan", TRAIN + " --l1 nan", "--l1"),
    Case("train-negative-lr-warmup", TRAIN + " --lr-warmup-steps -1", "--lr-warmup-steps"),
    Case("train-negative-l1-warmup", TRAIN + " --l1-warmup-steps -1", "--l1-warmup-steps"),
    Case("train-beta1-of-1", TRAIN + " --beta1 1", "--beta1"),
    Case("train-mix-fraction-above-1", TRAIN + " --mix-fraction 2", "--mix-fraction"),
    Case("train-negative-seed", TRAIN + " --seed -1", "--seed"),
    Case("train-zero-d-sae", TRAIN + " --d-sae 0", "--d-sae"),
    Case("train-zero-steps", TRAIN + " --steps 0", "--steps"),
    Case("train-tokens-below-a-batch", TRAIN.replace(" --steps 4", "") + " --tokens 1",
         "below one batch"),
    Case("train-checkpoint-not-multiple-of-log",
         TRAIN + " --log-every 10 --checkpoint-every 15", "--checkpoint-every"),
    Case("train-k-above-d-sae", TRAIN + " --arch topk --k 100000", "k must be between"),
    Case("train-cuda-graph-on-cpu", TRAIN + " --cuda-graph on", "needs a CUDA device"),
    Case("train-holdout-whole-cache", TRAIN + " --holdout-chunks 4", "holdout chunks"),
    Case("train-negative-holdout", TRAIN + " --holdout-chunks -1", "--holdout-chunks"),
    Case("train-existing-run-without-resume", TRAIN.replace("{out}", "{run}"), "already holds"),
    Case("train-resume-with-other-settings",
         "train --cache {syn} -o {run} --device cpu --no-progress --resume --lr 0.5",
         "settings differ"),
    Case("train-out-not-a-run-folder", TRAIN, "not a run folder", setup=_file("out/notes.txt")),
    Case("train-unwritable-out", TRAIN.replace("{out}", "{tmp}/file/run"), "cannot write",
         setup=_file("file")),

    # sweep
    Case("sweep-no-grid", SWEEP, "no grid"),
    Case("sweep-missing-grid-file", SWEEP + " --grid {tmp}/nope.toml", "nope.toml"),
    Case("sweep-grid-not-toml", SWEEP + " --grid {tmp}/g.toml", "g.toml",
         setup=_file("g.toml", "[grid\n")),
    Case("sweep-grid-unknown-key", SWEEP + " --grid {tmp}/g.toml", "nope",
         setup=_file("g.toml", "nope = 1\n[grid]\nl1 = [0.001]\n")),
    Case("sweep-grid-unknown-axis", SWEEP + " --grid {tmp}/g.toml", "nope",
         setup=_file("g.toml", "[grid]\nnope = [1, 2]\n")),
    Case("sweep-grid-not-a-table", SWEEP + " --grid {tmp}/g.toml", "grid",
         setup=_file("g.toml", "grid = [1, 2]\n")),
    Case("sweep-grid-axis-not-a-list", SWEEP + " --grid {tmp}/g.toml", "l1",
         setup=_file("g.toml", "[grid]\nl1 = 0.5\n")),
    Case("sweep-grid-wrong-value-type", SWEEP + " --grid {tmp}/g.toml", "--l1",
         setup=_file("g.toml", '[grid]\nl1 = ["a", "b"]\n')),
    Case("sweep-grid-wrong-base-type", SWEEP + " --grid {tmp}/g.json", "--lr",
         setup=_file("g.json", json.dumps({"lr": "fast", "grid": {"l1": [0.001]}}))),
    Case("sweep-grid-sets-out", SWEEP + " --grid {tmp}/g.json", "out",
         setup=_file("g.json", json.dumps({"out": "elsewhere", "grid": {"l1": [0.001]}}))),
    Case("sweep-set-out", SWEEP + " --set out=a,b", "out"),
    Case("sweep-set-resume", SWEEP + " --set resume=true,false", "resume"),
    Case("sweep-set-shared-setting", SWEEP + " --set batch_size=32,64", "share batch_size"),
    Case("sweep-set-unknown", SWEEP + " --set nope=1,2", "nope"),
    Case("sweep-set-not-a-number", SWEEP + " --set l1=abc", "expected float"),
    Case("sweep-point-lr-nan", SWEEP + " --set lr=0.001,nan", "--lr"),
    Case("sweep-point-k-above-d-sae", SWEEP + " --set arch=relu,topk --k 100000",
         "k must be between"),
    Case("sweep-holdout-whole-cache", SWEEP + " --set l1=0.001,0.002 --holdout-chunks 4",
         "holdout chunks"),
    Case("sweep-layer-not-in-cache", SWEEP + " --set l1=0.001,0.002 --layer 5", "layer 5"),

    # eval
    Case("eval-missing-run", "eval {tmp}/nope --ce-sequences 0", "nope"),
    Case("eval-missing-argument", "eval", "Missing argument", usage=True),
    Case("eval-holdout-chunks-0", EVAL + " --holdout-chunks 0", "--holdout-chunks"),
    Case("eval-holdout-whole-cache", EVAL + " --holdout-chunks 9", "holdout chunks"),
    Case("eval-absorption-every-0", EVAL + " --absorption --absorption-every 0",
         "--absorption-every"),
    Case("eval-negative-ce-sequences", EVAL.replace("--ce-sequences 0", "--ce-sequences -1"),
         "--ce-sequences"),
    Case("eval-unknown-stream", EVAL + " --stream nope", "--stream"),
    Case("eval-missing-cache", EVAL + " --cache {tmp}/nope", "nope"),
    Case("eval-cache-of-another-width", EVAL + " --cache {tiny}", "d_in is 16"),
    Case("eval-cache-of-another-model", EVAL + " --cache {other}", "another model"),
    Case("eval-unwritable-sae-dir", EVAL.replace("{run}", "{tmp}/runcopy"), "eval.json",
         setup=_run_copy(lambda run: (run / "eval.json").mkdir()), needs=("run",)),

    # plan
    Case("plan-unknown-preset", "plan --model llama-9-9b --tflops 1", "unknown model"),
    Case("plan-layer-out-of-range", "plan --model llama-3-8b --layer 32 --tflops 1", "32 layers"),
    Case("plan-zero-tflops", "plan --model llama-3-8b --tflops 0", "--tflops"),
    Case("plan-context-beyond-positions", "plan --model llama-3-8b --context-length 10000 "
         "--rows-per-chunk 10000 --tflops 1", "8192 positions"),

    # audit
    Case("audit-missing-run", "audit {tmp}/nope", "nope"),
    Case("audit-not-a-run", "audit {tmp}/empty", "not a run folder", setup=_folder("empty")),
    Case("audit-garbled-train-config", "audit {tmp}/runcopy", "train_config.json",
         setup=_run_copy(lambda run: (run / "train_config.json").write_text("{garbled")),
         needs=("run",)),

    # features
    Case("features-missing-run", "features {tmp}/nope", "nope"),
    Case("features-huge-latent-range", FEATURES + " --latents 0-20000000", "out of range"),
    Case("features-bad-latents", FEATURES + " --latents a-b", "cannot read latents"),
    Case("features-zero-examples", FEATURES + " --examples 0", "--examples"),
    Case("features-zero-tokens", FEATURES + " --tokens 0", "--tokens"),
    Case("features-holdout-chunks-0", FEATURES + " --holdout-chunks 0", "--holdout-chunks"),
    Case("features-cache-of-another-model", FEATURES + " --cache {other}", "another model"),
    Case("features-unwritable-out", FEATURES + " --out {tmp}/file/site", "cannot write",
         setup=_file("file")),
]


# placeholder -> fixture name (built only for the cases that use it)
PLACES = {"syn": "syn_cache", "other": "other_model_cache", "run": "trained_run",
          "model": "tiny_model", "corpus": "corpus", "tiny": "tiny_cache"}


def _synthetic(tmp_path_factory, name: str, seed: int) -> Path:
    root = tmp_path_factory.mktemp("bad_input") / name
    write_synthetic_cache(root, n_chunks=4, rows_per_chunk=256, d_model=16, layers=(1,),
                          context_length=32, seed=seed, index_column=False)
    return root


@pytest.fixture(scope="module")
def syn_cache(tmp_path_factory) -> Path:
    return _synthetic(tmp_path_factory, "syn", seed=0)


@pytest.fixture(scope="module")
def other_model_cache(tmp_path_factory) -> Path:
    """The same shape as syn_cache (d_model, hook) from another 'model' (fingerprint)."""
    return _synthetic(tmp_path_factory, "other", seed=1)


@pytest.fixture(scope="module")
def trained_run(syn_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_input") / "run"
    train(TrainConfig.from_flat(cache=str(syn_cache), out=str(out), expansion=2, batch_size=64, steps=10,
                      log_every=5, checkpoint_every=10, holdout_chunks=1, device="cpu",
                      progress=False))
    return out


def snapshot(roots: list[Path]) -> dict[str, tuple]:
    """Every file and folder under roots: files by (mtime, size), folders by presence (their
    mtimes move when a probe lists them on some file systems)."""
    seen = {}
    for root in roots:
        for dirpath, _dirs, filenames in os.walk(root):
            seen[dirpath] = ("dir",)
            for name in filenames:
                st = os.lstat(os.path.join(dirpath, name))
                seen[os.path.join(dirpath, name)] = (st.st_mtime_ns, st.st_size)
    return seen


def assert_one_paragraph(stderr: str, usage: bool) -> None:
    assert "Traceback" not in stderr, stderr
    text = stderr.strip()
    assert text, "nothing on stderr"
    assert "\n\n" not in text and not any(not line.strip() for line in text.splitlines()), stderr
    if usage:  # typer's: "Usage: ...", "Try ... --help", a boxed message
        assert text.startswith("Usage:"), stderr
    else:
        assert text.startswith("error: "), stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_paragraph_and_changes_nothing(case, request, tmp_path,
                                                                  monkeypatch):
    places = {"tmp": str(tmp_path), "out": str(tmp_path / "out")}
    for place, fixture in PLACES.items():
        if "{" + place + "}" in case.argv or place in case.needs:
            places[place] = str(request.getfixturevalue(fixture))
    if case.setup is not None:
        case.setup(tmp_path, places)
    argv = [part.format(**places) for part in case.argv.split()]
    monkeypatch.chdir(tmp_path)  # relative writes would land in the snapshot
    roots = [tmp_path] + [Path(places[p]) for p in PLACES if p in places]
    before = snapshot(roots)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert_one_paragraph(result.stderr, case.usage)
    assert case.needle in result.stderr, result.stderr
    assert snapshot(roots) == before, "files changed"
