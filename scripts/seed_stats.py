"""Statistics across seeds for scripts/compare_masking.py: the mean with a 95% Student t
interval, and the paired difference of two settings trained with the same seeds."""

from __future__ import annotations

import math

# Two-sided 95% quantiles of Student's t, by degrees of freedom (1..30).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
       2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
       2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df: int) -> float:
    """The quantile for df degrees of freedom; past the table, its last entry (a slightly wider
    interval than the exact one, never a narrower)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    return T95[min(df, len(T95)) - 1]


def summarize(values: list[float | None]) -> dict:
    """Mean, 95% half-width and bounds of the values that exist (None: no result for that seed).
    With one value there is no interval (half_width None); with none, no mean either."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "half_width": None, "low": None, "high": None}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "half_width": None, "low": None, "high": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t95(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "half_width": half, "low": mean - half, "high": mean + half}


def paired(base: dict, other: dict) -> dict:
    """Summary of other - base over the seeds (keys) where both have a value, so each
    difference compares two SAEs that share their seed; `excludes_zero` says whether the 95%
    interval lies wholly on one side of 0 (None without an interval)."""
    seeds = sorted(s for s in base if s in other and base[s] is not None
                   and other[s] is not None)
    out = summarize([other[s] - base[s] for s in seeds])
    out["seeds"] = seeds
    out["excludes_zero"] = None if out["half_width"] is None else (
        out["low"] > 0 or out["high"] < 0)
    return out


def cell(summary: dict, digits: int = 3) -> str:
    """"mean ± half-width" for a table, "mean" alone without an interval, "n/a" without a mean."""
    if summary["mean"] is None:
        return "n/a"
    if summary["half_width"] is None:
        return f"{summary['mean']:.{digits}g}"
    return f"{summary['mean']:.{digits}g} ± {summary['half_width']:.2g}"
