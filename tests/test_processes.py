"""pipeline.processes without a launcher: dealing, the single-process collectives, and the bad
settings a launch refuses."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.processes import ALONE, Workers, check_launch, peer_timeout


def test_uneven_grids_are_dealt_round_robin_without_overlap():
    points = list(range(5))
    dealt = [Workers(rank=r, world=2).dealt(points) for r in (0, 1)]
    assert dealt == [[0, 2, 4], [1, 3]]
    assert Workers(rank=2, world=3).dealt([0, 1]) == []  # more processes than points


def test_one_process_collectives_are_the_identity():
    t = torch.tensor([1.5, -2.0])
    assert ALONE.mean_(t) is t and ALONE.sum_(t) is t and ALONE.min_(t) is t
    assert torch.equal(t, torch.tensor([1.5, -2.0]))
    assert ALONE.gather(t) is t
    ALONE.agree(None)
    with pytest.raises(PipelineError, match="bad grid"):
        ALONE.agree("bad grid")
    assert ALONE.checked(lambda ready: (ready(), 7)[1]) == 7


def test_bad_launch_settings_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineError, match="would put every process on that one GPU"):
        check_launch("cuda:1")
    check_launch("cuda")
    for bad in ("abc", "0", "-5"):
        monkeypatch.setenv("PIPELINE_PEER_TIMEOUT", bad)
        with pytest.raises(PipelineError, match="expected a whole number of seconds"):
            peer_timeout()
    monkeypatch.setenv("PIPELINE_PEER_TIMEOUT", "30")
    assert peer_timeout() == 30
