"""The captured training step on CUDA: the device and capture stream are the SAE's own, a capture
that fails is not kept, and without graphs Adam is not capturable. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from pipeline.sae import build_sae, sae_config
from pipeline.train.step import TrainStep
from tests.test_data_parallel import last_state, train_args
from tests.test_distributed import cache, launch  # noqa: F401 - cache is a fixture

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def step_on(device: str, use_graph: bool) -> TrainStep:
    sae = build_sae(sae_config("topk", 64, 256, k=8), torch.Generator().manual_seed(0)).to(device)
    return TrainStep(sae, 128, 64, 1.0, 100, 1e-3, use_graph=use_graph)


def test_adam_is_capturable_only_for_graphs():
    step = step_on("cpu", use_graph=False)
    assert not step.opt.param_groups[0]["capturable"]


@cuda
@pytest.mark.parametrize("use_graph", [False, True])
def test_adam_on_cuda_is_capturable_only_with_graphs(use_graph):
    assert step_on("cuda", use_graph).opt.param_groups[0]["capturable"] == use_graph


@cuda
def test_a_failed_capture_is_not_kept(monkeypatch):
    step = step_on("cuda", use_graph=True)
    step.load(torch.randn(128, 64, device="cuda"))
    for _ in range(3):
        step.run()  # eager warm-up
    real = step._step

    def fails():
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("capture failed")
        real()

    monkeypatch.setattr(step, "_step", fails)
    with pytest.raises(RuntimeError, match="capture failed"):
        step.run()
    assert step.graph is None  # before: the broken graph was stored and replayed next
    monkeypatch.setattr(step, "_step", real)
    step.run()
    assert step.graph is not None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_capture_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    step = step_on("cuda:1", use_graph=True)
    x = torch.randn(128, 64, device="cuda:1")
    eager = step_on("cuda:1", use_graph=False)
    for s in (step, eager):
        s.load(x)
        for _ in range(6):
            s.run()
    torch.testing.assert_close(step.sae.W_dec, eager.sae.W_dec, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_data_parallel_step_captured_with_its_all_reduces_equals_eager(arch, cache, tmp_path):  # noqa: F811
    flags = ("--arch", arch, "--device", "cuda", "--k", "2") if arch == "topk" else \
        ("--arch", arch, "--device", "cuda")
    for graph in ("on", "off"):
        launch(2, train_args(cache, tmp_path / graph, *flags, "--cuda-graph", graph))
    on, off = last_state(tmp_path / "on"), last_state(tmp_path / "off")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(on[name], off[name], rtol=1e-4, atol=1e-5)
