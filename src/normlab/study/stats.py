"""Mean and 95% confidence intervals over seeds (Student's t), and paired comparisons."""

from __future__ import annotations

import math

import numpy as np


def t975(df: int) -> float:
    if df < 1:
        return math.inf
    from scipy.stats import t  # scipy is a dependency of mnist1d

    return float(t.ppf(0.975, df))


def mean_ci(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95% interval, n); half-width is inf for n < 2."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(v[0]), math.inf, 1
    return float(v.mean()), t975(n - 1) * float(v.std(ddof=1)) / math.sqrt(n), n


def paired(a: dict, b: dict) -> tuple[float, float, int]:
    """Mean and 95% half-width of a[seed] - b[seed] over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    return mean_ci([a[s] - b[s] for s in seeds])


def status_of(mean: float, half: float, n: int, *, min_effect: float = 0.0) -> str:
    """The claim predicts a difference of at least ``min_effect``. 'supported': the whole 95%
    interval lies above ``min_effect``; 'not supported': it lies entirely below it (the effect
    is absent, negligible or reversed); 'inconclusive': it contains ``min_effect``."""
    if n == 0 or not math.isfinite(mean):
        return "inconclusive"
    if mean - half > min_effect:
        return "supported"
    if mean + half < min_effect:
        return "not supported"
    return "inconclusive"


def fmt_pm(mean: float, half: float, scale: float = 100.0, unit: str = " pts") -> str:
    if not math.isfinite(mean):
        return "n/a"
    h = "inf" if not math.isfinite(half) else f"{half * scale:.1f}"
    return f"{mean * scale:+.1f} ± {h}{unit}"
