"""Two extraction processes (torchrun, gloo on CPU) write the same cache as one; a killed worker
leaves a resumable cache, never a complete-looking one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache_schema import list_done_chunks, read_manifest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extract_args(model, corpus, out) -> list[str]:
    return ["extract", "--model", str(model), "--corpus", str(corpus), "--layer", "1",
            "--layer", "2", "--tokens", str(24 * 256), "--context-length", "32",
            "--rows-per-chunk", "256", "--batch-size", "2", "--device", "cpu", "--no-progress",
            "--out", str(out)]


def command(n: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m",
            "pipeline.cli", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def run(n: int, args: list[str]) -> subprocess.CompletedProcess:
    """Run a launch to its end; no retry (an earlier retry hid a real race: every process created
    the zarr arrays it found missing, and one failed on the other's)."""
    done = subprocess.run(command(n, args), env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_two_processes_write_the_same_cache_as_one(tiny_model, corpus, tmp_path):
    run(1, extract_args(tiny_model, corpus, tmp_path / "one"))
    two = run(2, extract_args(tiny_model, corpus, tmp_path / "two"))
    assert "process 0 of 2" in two.stderr and "process 1 of 2" in two.stderr
    assert read_manifest(tmp_path / "two").status == "complete"
    assert read_manifest(tmp_path / "two").cache_id == read_manifest(tmp_path / "one").cache_id
    assert files(tmp_path / "two") == files(tmp_path / "one")


@pytest.mark.slow
def test_a_killed_worker_leaves_a_resumable_cache(tiny_model, corpus, tmp_path):
    run(1, extract_args(tiny_model, corpus, tmp_path / "ref"))
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(2, extract_args(tiny_model, corpus, out)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_done_chunks(out)) < 4:
        time.sleep(0.05)
    workers = children(proc.pid)
    assert len(workers) == 2, "torchrun should have started two workers"
    os.kill(workers[-1], signal.SIGKILL)
    proc.wait(timeout=120)
    assert read_manifest(out).status == "writing"
    assert len(list_done_chunks(out)) < 24
    run(1, extract_args(tiny_model, corpus, out))
    assert files(out) == files(tmp_path / "ref")


@pytest.mark.slow
def test_a_second_job_is_refused_by_every_rank_while_another_holds_the_cache(tiny_model, corpus,
                                                                            tmp_path):
    from tests.test_extract_trust import hold_lock

    out = tmp_path / "held"
    holder = hold_lock(out)
    try:
        done = subprocess.run(command(2, extract_args(tiny_model, corpus, out)), env=ENV,
                              capture_output=True, text=True, timeout=300, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0
    assert "error: cache folder" in done.stderr and "being written by another" in done.stderr
    # rank 0 exits 2 and torchrun stops the other (torchrun prints its own launcher traceback)
    assert "exitcode  : 2" in done.stderr and "pipeline/extract" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
