"""Remote caches as the CLI meets them (a moto server, never a real cloud): s3:// URLs kept
whole, inspect/verify/train through the mirror, and a mirror that trusts nothing in the bucket."""

from __future__ import annotations

import fcntl
import json
import os

import pytest
from typer.testing import CliRunner

from tests.test_remote import bucket  # noqa: F401 (the moto fixture)

pytest.importorskip("s3fs")
runner = CliRunner()


def fs():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


def new_process() -> None:
    """Forget this process's mirrors, as a new `pipeline` process starts without them."""
    from pipeline import remote

    for m in remote._MIRRORS.values():
        m.release()
    remote._MIRRORS.clear()


def extract_args(out, model, corpus, *extra) -> list[str]:
    return ["extract", "--out", str(out), "--model", str(model), "--corpus", str(corpus),
            "--layer", "1", "--tokens", "1024", "--context-length", "32", "--rows-per-chunk",
            "256", "--batch-size", "4", "--device", "cpu", "--no-progress", *extra]


def train_args(cache, out, *extra) -> list[str]:
    return ["train", "--cache", str(cache), "-o", str(out), "-l", "1", "--steps", "8",
            "--batch-size", "32", "--log-every", "4", "--checkpoint-every", "4",
            "--holdout-chunks", "1", "--device", "cpu", "--no-progress", *extra]


def upload(local, prefix: str) -> None:
    """Replace the bucket's prefix with a local cache folder's files (another machine's extract)."""
    s3 = fs()
    if s3.exists(prefix):
        s3.rm(prefix, recursive=True)
    for p in sorted(local.rglob("*")):
        if p.is_file() and p.name != ".lock":
            s3.put_file(str(p), f"{prefix}/{p.relative_to(local).as_posix()}")


def test_cli_extract_to_s3_then_inspect_verify_and_train_read_it(bucket, tiny_model,  # noqa: F811
                                                                  corpus, tmp_path, monkeypatch):
    from pipeline.cli import app

    monkeypatch.chdir(tmp_path)
    url = f"{bucket}/cli"
    r = runner.invoke(app, extract_args(url, tiny_model, corpus))
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "s3:").exists(), "the URL was taken for a local path"
    assert fs().exists("caches/cli/zarr.json") and fs().exists("caches/cli/_chunks/00000003.json")
    new_process()
    r = runner.invoke(app, ["inspect", url])
    assert r.exit_code == 0, r.output
    assert "status      complete: 4/4 chunks" in r.output
    new_process()
    r = runner.invoke(app, ["verify", url])
    assert r.exit_code == 0, r.output
    assert "all 4 chunks match their checksums" in r.output
    new_process()
    r = runner.invoke(app, train_args(url, tmp_path / "run"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "sae_weights.safetensors").is_file()


def test_cli_verify_names_a_tampered_remote_chunk_and_mirrors_nothing_of_it(
        bucket, tiny_model, corpus, tmp_path, monkeypatch):  # noqa: F811
    from pipeline.cli import app
    from pipeline.remote import mirror

    url = f"{bucket}/tampered"
    assert runner.invoke(app, extract_args(url, tiny_model, corpus)).exit_code == 0
    key = "caches/tampered/clean/blocks.1.hook_resid_post/c/2/0"
    data = bytearray(fs().cat(key))
    data[100] ^= 0xFF
    fs().pipe(key, bytes(data))
    fs().rm("caches/tampered/tokens/c/3")  # the mirror still has its copy: verify checks the bucket
    new_process()
    r = runner.invoke(app, ["verify", url])
    assert r.exit_code == 1, r.output
    assert "chunk 2" in r.output and "clean/blocks.1.hook_resid_post" in r.output
    assert "chunk 3 of tokens is missing" in r.output
    assert "2 problem(s)" in r.output
    new_process()  # a reader on another machine, with an empty mirror, refuses it too
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "other-home"))
    r = runner.invoke(app, train_args(url, tmp_path / "run"))
    assert r.exit_code == 2, r.output
    assert "chunk 2 of clean/blocks.1.hook_resid_post" in r.output and "SHA-256" in r.output
    assert not (mirror(url).root / "clean/blocks.1.hook_resid_post/c/2/0").exists()


def test_a_cache_replaced_in_the_bucket_is_read_afresh_not_from_the_old_mirror(
        bucket, tiny_model, corpus, tmp_path):  # noqa: F811
    from pipeline.cli import app

    url, prefix = f"{bucket}/replaced", "caches/replaced"
    assert runner.invoke(app, extract_args(tmp_path / "seed0", tiny_model, corpus)).exit_code == 0
    assert runner.invoke(app, extract_args(tmp_path / "seed7", tiny_model, corpus, "--seed",
                                           "7")).exit_code == 0
    upload(tmp_path / "seed0", prefix)
    masked = ("--stream", "masked")  # the mask seed changes the masked stream only
    new_process()
    r = runner.invoke(app, train_args(url, tmp_path / "old", *masked))  # fills the mirror
    assert r.exit_code == 0, r.output
    upload(tmp_path / "seed7", prefix)  # another machine replaces the cache (a new cache id)
    from pipeline.remote import local_cache, mirror

    old_root = local_cache(url)
    still_reading = os.open(old_root.parent / f".{old_root.name}.lock", os.O_RDONLY)
    fcntl.flock(still_reading, fcntl.LOCK_SH)  # another process still trains on the old cache
    new_process()
    r = runner.invoke(app, train_args(url, tmp_path / "new", *masked))
    assert r.exit_code == 0, r.output
    new_root = mirror(url).root
    assert new_root != old_root and old_root.is_dir()  # in use: kept
    os.close(still_reading)
    new_process()
    local_cache(url)  # the next reader removes the old cache's mirror, not the new one's
    assert not old_root.exists() and (new_root / "zarr.json").is_file()
    assert not (old_root.parent / f".{old_root.name}.lock").exists()  # its lock file too
    r = runner.invoke(app, train_args(tmp_path / "seed7", tmp_path / "local", *masked))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "new" / "sae_weights.safetensors").read_bytes() == \
        (tmp_path / "local" / "sae_weights.safetensors").read_bytes()
    seed7_id = json.loads((tmp_path / "seed7" / "zarr.json").read_text())[
        "attributes"]["manifest"]["cache_id"]
    assert json.loads((tmp_path / "new" / "cfg.json").read_text())["metadata"].get(
        "cache_id", seed7_id) == seed7_id


def test_a_hostile_key_in_the_bucket_writes_nothing_outside_the_mirror(
        bucket, tiny_cache, tmp_path_factory):  # noqa: F811
    from cache_schema import open_cache
    from pipeline.remote import local_cache

    url = f"{bucket}/hostile"
    upload(tiny_cache, "caches/hostile")
    for key in ("_chunks/../../../../evil-a5c1.json", "_chunks/../../evil-a5c1.json",
                "clean/../../../evil-a5c1/zarr.json", "_chunks/00000001.json.evil-a5c1",
                "_chunks/../../../../../evil-a5c1/zarr.json"):
        fs().pipe(f"caches/hostile/{key}", b"planted")
    new_process()
    assert open_cache(local_cache(url)).n_chunks == 4  # what train, eval and features do
    planted = [p for p in tmp_path_factory.getbasetemp().rglob("*evil-a5c1*")]
    assert planted == []


def test_cli_overwrite_of_a_remote_cache_refuses_then_replaces_only_its_entries(
        bucket, tiny_model, corpus, tmp_path):  # noqa: F811
    from pipeline.cli import app

    url, prefix = f"{bucket}/over", "caches/over"
    assert runner.invoke(app, extract_args(url, tiny_model, corpus)).exit_code == 0
    fs().pipe(f"{prefix}/notes.md", b"mine")
    r = runner.invoke(app, extract_args(url, tiny_model, corpus, "--seed", "7"))
    assert r.exit_code == 2 and "different settings" in r.output and "mask_seed" in r.output
    r = runner.invoke(app, extract_args(url, tiny_model, corpus, "--seed", "7", "--overwrite"))
    assert r.exit_code == 0, r.output
    manifest = json.loads(fs().cat(f"{prefix}/zarr.json"))["attributes"]["manifest"]
    assert manifest["mask_seed"] == 7 and manifest["status"] == "complete"
    assert fs().cat(f"{prefix}/notes.md") == b"mine"
    new_process()
    r = runner.invoke(app, ["verify", url])
    assert r.exit_code == 0, r.output


def test_a_reader_waiting_on_a_pruned_lock_file_locks_the_new_one(tmp_path, monkeypatch):
    """A prune removes a cache id's lock file while it holds it; a process that was waiting
    on that file must not take it as held, or a later prune would remove its folder."""
    import threading

    from pipeline.remote import Mirror

    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    m = Mirror("memory://bucket/pruned")
    cache_id = "a" * 16
    path = m.home / f".{cache_id}.lock"
    pruning = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(pruning, fcntl.LOCK_EX)
    waiter = threading.Thread(target=m.folder, args=(cache_id,))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # blocked by the prune
    os.unlink(path)
    os.close(pruning)
    waiter.join(5)
    assert not waiter.is_alive()
    assert os.path.samestat(path.stat(), os.fstat(m._in_use[cache_id]))
    m.release()
