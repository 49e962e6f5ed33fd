"""pipeline.processes without a launcher: dealing, the single-process collectives, the bad
settings a launch refuses, and how a failed collective names the lost peer from the heartbeats."""

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


def test_a_failed_collective_names_the_peers_that_stopped_beating_or_lag_behind(monkeypatch):
    from pipeline.heartbeat import STALE_S, explain, judge

    # peers 1..4 when process 0's 7th collective failed: 1 beat since (at the same collective),
    # 2 beat since but is at its 6th, 3 never beat again, 4 never beat at all
    first = {1: (10, 7), 2: (9, 6), 3: (12, 7)}
    last = {1: (11, 7), 2: (10, 6), 3: (12, 7)}
    early = judge([1, 2, 3, 4], first, last, waited_s=1.0, exchanges=7)
    assert (early.gone, early.behind, early.waiting) == ([], [2], [3, 4])  # too soon to say
    late = judge([1, 2, 3, 4], first, last, waited_s=STALE_S, exchanges=7)
    assert (late.gone, late.behind, late.waiting) == ([3, 4], [2], [])
    assert explain(0, 5, late, "60 s").startswith(
        f"process 0 of 5 lost processes 3, 4 (no heartbeat for {STALE_S:g} s")
    alive = judge([1, 2], first, last, waited_s=1.0, exchanges=7)
    assert explain(0, 3, alive, "60 s").startswith(
        "process 0 of 3 got no answer from process 2 within 60 s")
    assert explain(0, 2, judge([1], first, last, 1.0, 7), "60 s") is None  # nobody to name
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert "lost the rendezvous store, hosted by process 0" in explain(1, 2, None, "60 s")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # torchrun's agent hosts it
    assert "hosted by the launcher on the first machine" in explain(1, 2, None, "60 s")


def test_the_heartbeat_is_read_through_the_store_and_its_loss_is_named(monkeypatch):
    import datetime

    from pipeline import heartbeat

    monkeypatch.setattr(heartbeat, "INTERVAL_S", 0.05)
    monkeypatch.setattr(heartbeat, "STALE_S", 0.3)
    server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=5))
    beats = [heartbeat.Heartbeat(server, r, 4) for r in range(3)]  # 3 never starts
    beats[1].exchanges = 4
    beats[2].stop()  # process 2 dies: its beats stop
    beats[0].exchanges = 5
    verdict = beats[0].diagnose()
    assert (verdict.gone, verdict.behind) == ([2, 3], [1])
    for b in beats:
        b.stop()
    del server  # the store's host is gone
    assert beats[0].diagnose() is None
