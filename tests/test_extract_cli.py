"""The extract command as a user meets it: bad input, existing outputs, kill -9 and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cache_schema import STATUS_COMPLETE, list_done_chunks, read_manifest
from pipeline.cli import app
from tests.conftest import make_corpus, make_tiny_llama
from tests.test_extract import tiny_config, tree_bytes

runner = CliRunner()


def cli_args(out, model, corpus, *extra) -> list[str]:
    return ["extract", "--out", str(out), "--model", str(model), "--corpus", str(corpus),
            "--layer", "1", "--tokens", "512", "--context-length", "32", "--rows-per-chunk", "256",
            "--no-progress", "--device", "cpu", *extra]


def assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ")
    for needle in needles:
        assert needle in result.output, result.output


def test_missing_model_path(tmp_path, corpus):
    r = runner.invoke(app, cli_args(tmp_path / "o", tmp_path / "no_such_model", corpus))
    assert_clean_error(r, "does not exist")


def test_layer_out_of_range(tmp_path, tiny_model, corpus):
    r = runner.invoke(app, cli_args(tmp_path / "o", tiny_model, corpus, "--layer", "9"))
    assert_clean_error(r, "layer(s) [9] out of range", "4 layers")


def test_empty_corpus(tmp_path, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    r = runner.invoke(app, cli_args(tmp_path / "o", tiny_model, empty))
    assert_clean_error(r, "below one chunk")


def test_unwritable_output(tmp_path, tiny_model, corpus):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = runner.invoke(app, cli_args(blocker / "cache", tiny_model, corpus))
    assert_clean_error(r, "cannot write the cache")


def test_token_budget_below_one_chunk(tmp_path, tiny_model, corpus):
    r = runner.invoke(app, cli_args(tmp_path / "o", tiny_model, corpus, "--tokens", "100"))
    assert_clean_error(r, "below one chunk")


def test_unknown_dtype(tmp_path, tiny_model, corpus):
    r = runner.invoke(app, cli_args(tmp_path / "o", tiny_model, corpus, "--dtype", "float8"))
    assert_clean_error(r, "unknown storage dtype 'float8'")


def test_other_settings_on_existing_cache_refused_unless_overwrite(tmp_path, tiny_model, corpus):
    out = tmp_path / "o"
    assert runner.invoke(app, cli_args(out, tiny_model, corpus)).exit_code == 0
    again = runner.invoke(app, cli_args(out, tiny_model, corpus))
    assert again.exit_code == 0 and STATUS_COMPLETE in again.output
    other = runner.invoke(app, cli_args(out, tiny_model, corpus, "--seed", "7"))
    assert_clean_error(other, "different settings", "mask_seed", "--overwrite")
    forced = runner.invoke(app, cli_args(out, tiny_model, corpus, "--seed", "7", "--overwrite"))
    assert forced.exit_code == 0, forced.output
    assert read_manifest(out).mask_seed == 7


def test_non_cache_folder_is_never_overwritten(tmp_path, tiny_model, corpus):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    r = runner.invoke(app, cli_args(out, tiny_model, corpus, "--overwrite"))
    assert_clean_error(r, "not a pipeline cache")
    assert (out / "thesis.tex").read_text() == "precious"


def test_inspect_shows_status_sizes_and_norms(tiny_cache):
    r = runner.invoke(app, ["inspect", str(tiny_cache)])
    assert r.exit_code == 0, r.output
    for needle in ("status      complete: 4/4 chunks", "clean/blocks.2.hook_resid_post",
                   "special mean", "masked", "total"):
        assert needle in r.output


def test_inspect_of_a_missing_cache_is_a_clean_error(tmp_path):
    assert_clean_error(runner.invoke(app, ["inspect", str(tmp_path / "nope")]), "no cache at")


@pytest.mark.slow
def test_kill_9_mid_extraction_then_resume_gives_identical_bytes(tmp_path):
    model = make_tiny_llama(tmp_path / "model", n_layers=4, d_model=256)
    corpus = make_corpus(tmp_path / "corpus", n_docs=40, words_per_doc=1000)
    settings = dict(layers=[2], tokens=96 * 256, context_length=64, rows_per_chunk=256,
                    batch_size=2)
    ref = tmp_path / "ref"
    from pipeline.extract.run import extract

    extract(tiny_config(ref, model, corpus, **settings), progress=False)

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "pipeline.cli", "extract", "--out", str(out), "--model",
            str(model), "--corpus", str(corpus), "--layer", "2", "--tokens", str(96 * 256),
            "--context-length", "64", "--rows-per-chunk", "256", "--batch-size", "2",
            "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list_done_chunks(out)) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list_done_chunks(out)
    assert 5 <= len(done) < 96, f"kill landed outside the run ({len(done)} chunks done)"
    with pytest.raises(Exception, match="not complete"):
        from cache_schema import open_cache

        open_cache(out)
    resumed = subprocess.run(args, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done)} already written" in resumed.stderr
    assert read_manifest(out).status == STATUS_COMPLETE
    assert tree_bytes(out) == tree_bytes(ref)
