"""Seed statistics of the experiment: means and spreads, paired differences with t-intervals, the
minimum detectable difference and the seeds it needs, rank correlation."""

from __future__ import annotations

import math
from typing import List, Sequence

from scipy.stats import t as student_t

def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for a single seed)."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarise(values: Sequence[float]) -> dict:
    return {"mean": mean(values), "sd": spread(values), "min": min(values), "max": max(values),
            "seeds": len(values)}


POWER = 0.80
"""The power the minimum detectable difference is stated at: detected four times in five."""


def t_quantile(probability: float, degrees: int) -> float:
    """Student's t quantile."""
    return float(student_t.ppf(probability, degrees))


def minimum_detectable_difference(pooled_sd: float, seeds: int, paired: bool = False) -> float:
    """The smallest true difference between two rows of `seeds` seeds each that a two-sided 5 %
    t-test detects with 80 % power, given the per-seed standard deviation (nan for one seed);
    ``paired``: the standard deviation is that of the per-seed differences. The usual approximation
    (t₀.₉₇₅ + t₀.₈₀) standard errors, with n − 1 degrees of freedom paired and 2(n − 1) unpaired
    (simulated power at 3 seeds: 77 %); the normal's 2.80 standard errors would understate it by
    about half at 3 seeds."""
    if seeds < 2:
        return math.nan
    degrees = seeds - 1 if paired else 2 * (seeds - 1)
    factor = t_quantile(0.975, degrees) + t_quantile(POWER, degrees)
    return factor * math.sqrt((1.0 if paired else 2.0) / seeds) * pooled_sd


def seeds_needed(pooled_sd: float, difference: float, paired: bool = False) -> int:
    """The fewest seeds per row (at least 2) for minimum_detectable_difference to reach `difference`."""
    seeds = 2
    while minimum_detectable_difference(pooled_sd, seeds, paired) > difference and seeds < 100000:
        seeds += 1
    return seeds


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """a − b paired by seed: mean, sd and the 95 % t-interval of the mean (nan bounds for one seed)."""
    deltas = [x - y for x, y in zip(a, b)]
    m, sd, n = mean(deltas), spread(deltas), len(deltas)
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"mean": m, "sd": sd, "low": m - half, "high": m + half, "seeds": n}


def ranks(values: Sequence[float]) -> List[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (nan for fewer than 3 points or a constant series)."""
    if len(x) < 3:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    mx, my = mean(rx), mean(ry)
    sx = math.sqrt(sum((v - mx) ** 2 for v in rx))
    sy = math.sqrt(sum((v - my) ** 2 for v in ry))
    if sx == 0 or sy == 0:
        return math.nan
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / (sx * sy)
