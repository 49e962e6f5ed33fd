"""`pipeline extract` against careless and concurrent use: one writer per cache folder,
--overwrite that removes only the cache, and bad input refused before any side effect."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from cache_schema import STATUS_COMPLETE, list_done_chunks, read_manifest
from pipeline.cli import app
from tests.test_extract_cli import assert_clean_error, cli_args

runner = CliRunner()

HOLD = textwrap.dedent("""
    import fcntl, os, sys, time
    os.makedirs(sys.argv[1], exist_ok=True)
    fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked", flush=True)
    time.sleep(600)
""")
TRY = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(3)
""")


def assert_error_last(result, *needles: str) -> None:
    """Exit 2 and one `error:` paragraph last, after any progress lines on stderr."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: "), result.output
    for needle in needles:
        assert needle in last, last


def hold_lock(folder) -> subprocess.Popen:
    """Another process holding the writer lock of folder (as a running extract job does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_while_a_job_holds_the_folder(tmp_path, tiny_model, corpus):
    out = tmp_path / "o"
    holder = hold_lock(out)
    try:
        r = runner.invoke(app, cli_args(out, tiny_model, corpus, "--seed", "3", "--overwrite"))
    finally:
        holder.kill()
        holder.wait()
    assert_clean_error(r, "being written by another", str(out), "Nothing was changed")
    assert len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_the_lock_is_held_for_the_whole_extraction(tmp_path, tiny_model, corpus, monkeypatch):
    from pipeline.extract import run

    out, seen = tmp_path / "o", []
    real = run.finalize

    def finalize_and_probe(root, m):
        seen.append(subprocess.run([sys.executable, "-c", TRY, str(out)]).returncode)
        return real(root, m)

    monkeypatch.setattr(run, "finalize", finalize_and_probe)
    r = runner.invoke(app, cli_args(out, tiny_model, corpus))
    assert r.exit_code == 0, r.output
    assert seen == [3], "another process could take the lock while the cache was written"
    assert subprocess.run([sys.executable, "-c", TRY, str(out)]).returncode == 0  # released


def test_a_lock_left_by_a_killed_job_does_not_block_the_resume(tmp_path, tiny_model, corpus):
    out = tmp_path / "o"
    holder = hold_lock(out)
    holder.send_signal(signal.SIGKILL)  # flock locks die with their process
    holder.wait()
    r = runner.invoke(app, cli_args(out, tiny_model, corpus))
    assert r.exit_code == 0, r.output
    assert read_manifest(out).status == STATUS_COMPLETE


def test_overwrite_removes_only_the_cache_entries(tmp_path, tiny_model, corpus):
    out = tmp_path / "o"
    assert runner.invoke(app, cli_args(out, tiny_model, corpus)).exit_code == 0
    (out / "notes.md").write_text("mine")
    (out / "runs" / "r1").mkdir(parents=True)
    (out / "runs" / "r1" / "cfg.json.tmp").write_text("also mine")
    r = runner.invoke(app, cli_args(out, tiny_model, corpus, "--seed", "7", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert read_manifest(out).mask_seed == 7 and read_manifest(out).status == STATUS_COMPLETE
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "runs" / "r1" / "cfg.json.tmp").read_text() == "also mine"
    r = runner.invoke(app, ["verify", str(out)])
    assert r.exit_code == 0, r.output


def test_overwrite_through_a_symlinked_cache_folder(tmp_path, tiny_model, corpus):
    real, link = tmp_path / "disk" / "real", tmp_path / "link"
    real.parent.mkdir()
    (real.parent / "neighbour.txt").write_text("keep")
    assert runner.invoke(app, cli_args(real, tiny_model, corpus)).exit_code == 0
    link.symlink_to(real, target_is_directory=True)
    r = runner.invoke(app, cli_args(link, tiny_model, corpus, "--seed", "7", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert read_manifest(real).mask_seed == 7 and read_manifest(real).status == STATUS_COMPLETE
    assert (real.parent / "neighbour.txt").read_text() == "keep"


@pytest.mark.parametrize("content", [
    b"this is not a model\n" * 50,
    b"GGUF" + bytes(range(256)),  # a bad version
    b"GGUF\x03\x00\x00\x00" + bytes(range(256)),  # a good header, then garbage
], ids=["no-magic", "bad-version", "truncated"])
def test_a_garbage_gguf_is_a_clean_error(tmp_path, corpus, monkeypatch, content):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    r = runner.invoke(app, cli_args(tmp_path / "o", bad, corpus))
    assert_error_last(r, str(bad), "GGUF")
    assert not (tmp_path / "o").exists()
    assert not (tmp_path / "home" / "models").exists() or \
        not any((tmp_path / "home" / "models").iterdir())


@pytest.mark.parametrize("extra,needle", [
    (("--seed", "-1"), "seed must be a non-negative integer"),
    (("--context-length", "1024", "--rows-per-chunk", "1024", "--tokens", "1024"),
     "max_position_embeddings"),
], ids=["negative-seed", "context-beyond-positions"])
def test_bad_settings_are_refused_before_any_side_effect(tmp_path, tiny_model, corpus, extra,
                                                         needle):
    r = runner.invoke(app, cli_args(tmp_path / "o", tiny_model, corpus, *extra))
    assert_clean_error(r, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("dtype,value", [("float32", float("nan")), ("float16", 1e6)],
                         ids=["nan", "float16-overflow"])
def test_non_finite_activations_stop_before_the_chunk_is_written(tmp_path, tiny_model, corpus,
                                                                 monkeypatch, dtype, value):
    from pipeline import models

    real, calls = models.load_truncated, []

    def poisoned(*args, **kwargs):
        base = real(*args, **kwargs)

        def hook(_module, _inputs, output):  # the second forward pass = chunk 1
            calls.append(1)
            if len(calls) == 2:
                h = output[0] if isinstance(output, tuple) else output
                with torch.no_grad():
                    h[0, 5, 0] = value  # clean stream, row 5 of the chunk
            return output

        models.decoder_layers(base)[1].register_forward_hook(hook)
        return base

    monkeypatch.setattr(models, "load_truncated", poisoned)
    out = tmp_path / "o"
    r = runner.invoke(app, cli_args(out, tiny_model, corpus, "--dtype", dtype))
    assert_error_last(r, "chunk 1", "clean stream of blocks.1.hook_resid_post", "row 5",
                       "non-finite")
    assert list_done_chunks(out) == [0]
    assert read_manifest(out).status == "writing"
    assert os.path.exists(out / "_chunks" / "00000000.json")


@pytest.mark.slow
def test_two_jobs_with_other_settings_on_one_folder_the_second_is_refused(tmp_path):
    """The issue's race: job B (--overwrite, another seed) starts while job A writes."""
    import time
    from pathlib import Path

    from cache_schema import verify
    from tests.conftest import make_corpus, make_tiny_llama

    model = make_tiny_llama(tmp_path / "model", n_layers=4, d_model=256)
    corpus = make_corpus(tmp_path / "corpus", n_docs=40, words_per_doc=1000)
    out = tmp_path / "shared"
    size = ["--layer", "2", "--tokens", str(96 * 256), "--context-length", "64",
            "--rows-per-chunk", "256", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    a = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "extract", "--out", str(out),
                          "--model", str(model), "--corpus", str(corpus), *size],
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list_done_chunks(out) and a.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    a_running = a.poll() is None
    b = runner.invoke(app, ["extract", "--out", str(out), "--model", str(model), "--corpus",
                            str(corpus), *size, "--seed", "7", "--overwrite"])
    _, a_err = a.communicate(timeout=300)
    assert a_running, "job A finished before job B started: the race was not exercised"
    assert_clean_error(b, "being written by another", str(out))
    assert a.returncode == 0, a_err
    m, problems = verify(out)
    assert m.status == STATUS_COMPLETE and m.mask_seed == 0 and problems == []
