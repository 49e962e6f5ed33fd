"""`pipeline train --resume` trusts a checkpoint only if its files hash to their last audit.log
entry and it holds every entry a resume needs; otherwise one clear error, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cache_schema.synthetic import write_synthetic_cache
from pipeline.cli import app
from pipeline.run import RunDir, layout


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trust") / "cache"
    write_synthetic_cache(root, n_chunks=4, rows_per_chunk=256, d_model=16, context_length=32,
                          index_column=False)
    return root


def train(cache: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["train", "--cache", str(cache), "-o", str(out),
                                    "--steps", "20", "--batch-size", "64", "--log-every", "10",
                                    "--checkpoint-every", "10", "--no-progress",
                                    "--device", "cpu", *extra])


@pytest.fixture
def run(cache, tmp_path) -> Path:
    out = tmp_path / "run"
    assert train(cache, out).exit_code == 0
    return out


def newest(run: Path) -> Path:
    return RunDir(run).checkpoints()[-1]


def assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, result.output


def test_an_untouched_checkpoint_is_resumed_from(cache, run):
    r = train(cache, run, "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output


def test_a_checkpoint_with_other_numbers_is_refused(cache, run):
    state = newest(run) / layout.STATE_FILE
    tensors = load_file(str(state))
    tensors["sae.W_dec"] = tensors["sae.W_dec"] + 1.0  # still a valid safetensors file
    save_file(tensors, str(state))
    assert_clean_error(train(cache, run, "--resume"), str(state), "was changed after it was "
                       "written", "audit.log", f"delete {newest(run)}")


def test_an_edited_checkpoint_meta_file_is_refused(cache, run):
    meta = newest(run) / layout.META_FILE
    meta.write_text(meta.read_text().replace('"metrics_offset": ', '"metrics_offset": 1'))
    assert_clean_error(train(cache, run, "--resume"), str(meta), "was changed")


def test_a_checkpoint_without_an_audit_entry_is_refused(cache, run):
    log = run / layout.AUDIT_LOG
    name = f"{layout.CHECKPOINTS}/{newest(run).name}/{layout.STATE_FILE}"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if json.loads(line)["file"] != name))
    assert_clean_error(train(cache, run, "--resume"), str(newest(run) / layout.STATE_FILE),
                       "has no entry in", "another --out")


def test_a_checkpoint_missing_an_entry_names_it(cache, run):
    state = newest(run) / layout.STATE_FILE
    tensors = load_file(str(state))
    del tensors["train.step"], tensors["rng.cpu"]
    save_file(tensors, str(state))
    RunDir(run).audit(20, [state])  # audited as it is now: only the missing entries are wrong
    assert_clean_error(train(cache, run, "--resume"), "lacks the entries rng.cpu, train.step",
                       f"delete {newest(run)}")
