"""scripts/seed_stats.py, the statistics of scripts/compare_masking.py: the Student t interval of
known numbers, differences paired by seed, and no interval from a single seed."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "seed_stats.py"
spec = importlib.util.spec_from_file_location("seed_stats", SCRIPT)
seed_stats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_stats)


def test_interval_of_known_numbers_matches_hand_computation():
    # mean 2.5, sample sd sqrt(5/3), t(3) = 3.182: half-width 3.182 * sqrt(5/3) / 2
    s = seed_stats.summarize([1.0, 2.0, 3.0, 4.0])
    half = 3.182 * math.sqrt(5 / 3) / 2
    assert s["n"] == 4 and s["mean"] == pytest.approx(2.5)
    assert s["half_width"] == pytest.approx(half) == pytest.approx(2.05397, abs=1e-5)
    assert (s["low"], s["high"]) == pytest.approx((2.5 - half, 2.5 + half))


def test_three_seeds_use_two_degrees_of_freedom():
    s = seed_stats.summarize([0.9, 0.91, 0.92])
    assert s["half_width"] == pytest.approx(4.303 * 0.01 / math.sqrt(3))


def test_one_value_has_no_interval_and_none_has_no_mean():
    assert seed_stats.summarize([0.3]) == {"n": 1, "mean": 0.3, "half_width": None,
                                           "low": None, "high": None}
    assert seed_stats.summarize([])["mean"] is None
    assert seed_stats.summarize([None, None])["n"] == 0


def test_missing_values_are_left_out():
    assert seed_stats.summarize([1.0, None, 3.0])["mean"] == pytest.approx(2.0)
    assert seed_stats.summarize([1.0, None, 3.0])["n"] == 2


def test_paired_difference_pairs_by_seed_not_by_order():
    # seeds differ a lot from each other but each pair by exactly 1: a zero-width interval
    base = {0: 1.0, 1: 10.0, 2: 100.0}
    other = {2: 101.0, 0: 2.0, 1: 11.0}
    d = seed_stats.paired(base, other)
    assert d["mean"] == pytest.approx(1.0) and d["half_width"] == pytest.approx(0.0)
    assert d["seeds"] == [0, 1, 2] and d["excludes_zero"] is True


def test_paired_difference_uses_only_seeds_both_have():
    d = seed_stats.paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: None, 3: 9.0})
    assert d["seeds"] == [0] and d["mean"] == pytest.approx(0.5)
    assert d["half_width"] is None and d["excludes_zero"] is None


def test_interval_across_zero_does_not_exclude_it():
    d = seed_stats.paired({0: 0.0, 1: 0.0, 2: 0.0}, {0: 1.0, 1: -1.0, 2: 0.5})
    assert d["low"] < 0 < d["high"] and d["excludes_zero"] is False


def test_quantiles_past_the_table_are_its_last_entry():
    assert seed_stats.t95(1) == 12.706
    assert seed_stats.t95(100) == seed_stats.t95(30) == 2.042
    with pytest.raises(ValueError):
        seed_stats.t95(0)


def test_cells_show_interval_mean_alone_or_na():
    assert seed_stats.cell(seed_stats.summarize([1.0, 2.0, 3.0])) == "2 ± 2.5"
    assert seed_stats.cell(seed_stats.summarize([0.5])) == "0.5"
    assert seed_stats.cell(seed_stats.summarize([])) == "n/a"
