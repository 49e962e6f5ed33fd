"""Linear layers with packed oneDNN weights (pipeline.models.packed): the same outputs, restored
afterwards, and a no-op where packing does not apply or fails."""

import pytest
import torch

from pipeline.models import ModelSource, load_truncated, packed_linears
from pipeline.models import packed as packed_module


def _forward(base, ids):
    with torch.no_grad():
        return base(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def _overridden(base):
    return [m for m in base.modules() if isinstance(m, torch.nn.Linear) and "forward" in vars(m)]


@pytest.fixture
def base(tiny_model):
    return load_truncated(ModelSource("tiny", str(tiny_model), "x"), 2, torch.float32, "cpu")


def test_packed_forward_equals_plain_and_is_restored(base):
    ids = torch.randint(0, base.config.vocab_size, (3, 11))
    plain = _forward(base, ids)
    with packed_linears(base) as on:
        assert on == torch.backends.mkldnn.is_available()
        if on:
            assert len(_overridden(base)) == sum(isinstance(m, torch.nn.Linear)
                                                 for m in base.modules())
        packed = _forward(base, ids)
    assert torch.allclose(packed, plain, atol=1e-5)
    assert not _overridden(base)


def test_not_float32_is_left_alone(base):
    base = base.to(torch.bfloat16)
    with packed_linears(base) as on:
        assert not on and not _overridden(base)


def test_a_failing_pack_falls_back_to_plain(base, monkeypatch):
    def broken(*_a):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(packed_module, "_pack", broken)
    ids = torch.randint(0, base.config.vocab_size, (2, 7))
    plain = _forward(base, ids)
    with packed_linears(base) as on:
        assert not on and not _overridden(base)
        assert torch.equal(_forward(base, ids), plain)
