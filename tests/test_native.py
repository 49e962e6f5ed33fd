"""The C kernels (pipeline/sae/kernels.c) against torch: each instruction-set path of the top-k,
the edge cases of SAE training (rows masked to -inf, ties, NaN, latents without entries), index
checks, and the fallback without a compiler."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from pipeline.sae import native

# Each vector path of the kernel, forced off in turn (x86 only: the flags are x86's).
X86 = platform.machine().lower() in ("x86_64", "amd64")
VARIANTS = [(), ("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2")] if X86 else [()]


@pytest.fixture(params=VARIANTS, ids=["native", "avx2", "scalar"][:len(VARIANTS)])
def lib(request):
    lib = native.library(request.param)
    if lib is None:
        pytest.skip("no C compiler: the CPU top-k kernel is not built")
    return lib


def check(pre: torch.Tensor, k: int, bias: torch.Tensor | None, lib) -> None:
    vals, idx = native.topk_rows(pre, k, bias, lib=lib)
    full = pre if bias is None else pre + bias
    ref = full.topk(k, dim=-1, sorted=False)
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vals.sort(-1).values, ref.values.sort(-1).values, **exact)
    torch.testing.assert_close(full.gather(1, idx), vals, **exact)  # indices point at values
    assert all(len(set(row.tolist())) == k for row in idx)  # no entry taken twice


@pytest.mark.parametrize("width,k", [(4608, 32), (1000, 7), (577, 33), (64, 64), (50, 1),
                                     (40, 30)])
def test_kernel_selects_what_torch_topk_selects(lib, width, k):
    gen = torch.Generator().manual_seed(width + k)
    pre = torch.randn(37, width, generator=gen)
    pre[:4] = torch.randint(0, 4, (4, width), generator=gen).float()  # ties everywhere
    pre[4:8, ::3] = float("-inf")
    pre[8:10] = pre[8:10].sort(-1).values  # increasing and decreasing rows: worst cases
    pre[10:12] = pre[10:12].sort(-1, descending=True).values
    pre[12, 5] = float("nan")  # NaN counts as the largest, as in torch.topk
    pre[13, :] = float("nan")
    for bias in (None, torch.randn(width, generator=gen)):
        check(pre, k, bias, lib)


def test_rows_with_fewer_eligible_entries_than_k_fill_with_minus_infinity(lib):
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(16, 512, generator=gen)
    only_dead = torch.full((512,), float("-inf"))
    only_dead[torch.randperm(512, generator=gen)[:20]] = 0.0  # 20 dead latents, aux_k 32
    vals, idx = native.topk_rows(pre, 32, only_dead, lib=lib)
    check(pre, 32, only_dead, lib)
    assert torch.isinf(vals).sum(1).eq(12).all()
    finite = idx[torch.isfinite(vals)].view(16, 20)
    assert torch.equal(finite.sort(1).values[0], (only_dead == 0).nonzero()[:, 0])
    only_dead[torch.randperm(512, generator=gen)[:30]] = 0.0  # 40-50 dead: no -inf taken
    vals, _ = native.topk_rows(pre, 32, only_dead, lib=lib)
    check(pre, 32, only_dead, lib)
    assert torch.isfinite(vals).all()


def test_one_wide_row_as_batch_topk_calls_it(lib):
    gen = torch.Generator().manual_seed(1)
    check(torch.randn(1, 300_000, generator=gen), 9_000, None, lib)  # scratch grows


def test_empty_batch_and_threads(lib):
    vals, idx = native.topk_rows(torch.randn(0, 64), 4, lib=lib)
    assert vals.shape == idx.shape == (0, 4)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            check(torch.randn(300, 4096), 16, None, lib)  # split into `threads` parts
    finally:
        torch.set_num_threads(before)


def test_bad_arguments_are_refused(lib):
    with pytest.raises(ValueError, match="k 65 out of range"):
        native.topk_rows(torch.randn(2, 64), 65, lib=lib)
    with pytest.raises(ValueError, match=r"bias shape \(63,\)"):
        native.topk_rows(torch.randn(2, 64), 4, torch.randn(63), lib=lib)


def test_outer_sum_and_entry_dots_match_dense_products(lib):
    gen = torch.Generator().manual_seed(3)
    n, rows, d_sae, width = 5000, 300, 70, 19  # latents 60-69 get no entries
    latents = torch.randint(0, 60, (n,), generator=gen)
    at = torch.randint(0, rows, (n,), generator=gen)
    g, m = torch.randn(n, generator=gen), torch.randn(rows, width, generator=gen)
    ref = torch.zeros(d_sae, rows).index_put((latents, at), g, accumulate=True) @ m
    torch.testing.assert_close(native.outer_sum(g, latents, at, m, d_sae, lib=lib), ref,
                               rtol=1e-4, atol=1e-4)
    empty = torch.zeros(0, dtype=torch.int64)
    assert native.outer_sum(torch.zeros(0), empty, empty, m, 5, lib=lib).abs().sum() == 0
    order = at.sort().indices  # entries by row, rows 0-299, some rows empty
    by_row, lat = at[order], latents[order]
    offsets = torch.searchsorted(by_row, torch.arange(rows))
    w = torch.randn(d_sae, width, generator=gen)
    torch.testing.assert_close(native.entry_dots(m, w, lat, offsets, lib=lib),
                               (m[by_row] * w[lat]).sum(1), rtol=1e-5, atol=1e-5)


def test_out_of_range_indices_raise_instead_of_reading_past_the_end(lib):
    m, g = torch.randn(10, 4), torch.randn(3)
    ok = torch.tensor([0, 1, 2])
    for latents, rows in ((torch.tensor([0, 5, 1]), ok), (torch.tensor([0, -1, 1]), ok),
                          (ok, torch.tensor([0, 10, 1]))):
        with pytest.raises(IndexError, match="outer_sum"):
            native.outer_sum(g, latents, rows, m, 5, lib=lib)
    with pytest.raises(IndexError, match="entry_dots"):
        native.entry_dots(m, torch.randn(5, 4), torch.tensor([0, 7, 1]),
                          torch.tensor([0] * 10), lib=lib)
    with pytest.raises(IndexError, match="entry_dots"):  # offsets not increasing
        native.entry_dots(m, torch.randn(5, 4), ok, torch.tensor([0, 2, 1] + [3] * 7), lib=lib)


def test_without_a_compiler_torch_is_used_and_a_warning_says_why(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.library(("-DNO_SUCH_BUILD",)) is None
    assert any("could not be built" in str(w.message) for w in caught)
    monkeypatch.setenv("PIPELINE_NATIVE", "0")
    assert not native.usable(torch.zeros(1))


def test_wrong_shapes_raise_instead_of_reading_past_the_end(lib):
    g, m = torch.randn(3, 4), torch.randn(10, 4)
    lat, offsets = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="entry_dots"):  # w narrower than g
        native.entry_dots(g, torch.randn(5, 2), lat, offsets, lib=lib)
    with pytest.raises(ValueError, match="entry_dots"):  # one offset per row
        native.entry_dots(g, torch.randn(5, 4), lat, torch.tensor([0, 1]), lib=lib)
    with pytest.raises(ValueError, match="outer_sum"):  # rows shorter than the entries
        native.outer_sum(torch.randn(3), lat, torch.tensor([0, 1]), m, 5, lib=lib)
    with pytest.raises(ValueError, match="outer_sum"):
        native.outer_sum(torch.randn(3), lat, lat, torch.randn(10), 5, lib=lib)
    with pytest.raises(ValueError, match="topk_rows"):
        native.topk_rows(torch.randn(64), 4, lib=lib)


PLANT = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w"); if (f) { fputs("ran", f); fclose(f); }
}
"""


def _plant(tmp_path, target):
    """Compile a library whose constructor writes a marker file, at `target`."""
    src = tmp_path / "plant.c"
    marker = tmp_path / "marker"
    src.write_text(PLANT.replace("MARKER", f'"{marker}"'))
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(target)], check=True)
    return marker


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_a_planted_library_is_never_loaded(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PIPELINE_HOME", str(home))
    assert native.library(("-DPLANTED",)) is not None
    [path] = (home / "kernels").glob("kernels-*.so")
    marker = _plant(tmp_path, path)  # same name, another library, no matching digest
    code = ("import warnings; warnings.simplefilter('always'); from pipeline.sae import native; "
            "print(native.library(('-DPLANTED',)) is not None)")
    env = {**os.environ, "PIPELINE_HOME": str(home), "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)  # a new process: this one has the real library loaded
    assert not marker.exists(), "the planted library's constructor ran"
    assert run.stdout.strip() == "True", run.stderr  # a trusted rebuild replaced it
    assert "does not match the SHA-256" in run.stderr


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_no_library_is_loaded_from_a_folder_others_can_write(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "kernels").mkdir(parents=True)
    os.chmod(home / "kernels", 0o777)
    monkeypatch.setenv("PIPELINE_HOME", str(home))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.library(("-DSHARED_HOME",)) is None
    assert any("only you can write" in str(w.message) for w in caught)
