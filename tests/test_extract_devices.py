"""Device settings that several launched extraction processes cannot share are refused before
anything is written; an offloaded embedding (meta weights) takes its inputs on the CPU."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.models import input_device


@pytest.mark.parametrize("flags,needle", [(["--device", "cuda:1"], "every process on that one GPU"),
                                          (["--device-map", "auto"], "spreads one process")])
def test_several_processes_refuse_a_shared_device_setting(tmp_path, monkeypatch, flags, needle):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "cache"
    r = CliRunner().invoke(app, ["extract", "--out", str(out), "--model", str(tmp_path / "m"),
                                 "--no-progress", *flags])
    assert r.exit_code == 2, r.output
    assert needle in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not out.exists()


class Base(torch.nn.Module):
    def __init__(self, device: str):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4, device=device)

    def get_input_embeddings(self):
        return self.embed


def test_inputs_follow_the_embedding_or_the_cpu_when_it_is_offloaded():
    assert input_device(Base("cpu")) == torch.device("cpu")
    assert input_device(Base("meta")) == torch.device("cpu")
    if torch.cuda.is_available():
        assert input_device(Base("cuda")).type == "cuda"
