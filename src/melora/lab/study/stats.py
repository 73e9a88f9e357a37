"""Paired comparison of two methods over shared seeds: per-seed differences and a 95% t interval."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Paired:
    """``a - b`` on the seeds both have; ``low``/``high`` is the 95% interval of the mean difference."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    std: float
    low: float | None
    high: float | None

    def verdict(self, lower_is_better: bool = False) -> str:
        """``beats`` / ``loses to`` when the interval excludes 0 (in a's favour or not), else ``ties``."""
        if self.low is None or self.high is None:
            return "too few seeds to call"
        if self.low > 0:
            return "loses to" if lower_is_better else "beats"
        if self.high < 0:
            return "beats" if lower_is_better else "loses to"
        return "ties"


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = 0.95) -> Paired | None:
    """Compare per-seed scores ``a`` and ``b`` (seed -> value) on their common seeds; None if none shared.

    The interval is mean ± t_{(1+confidence)/2, k-1} · s / sqrt(k) for k shared seeds (k >= 2).
    """
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return None
    diffs = tuple(a[s] - b[s] for s in seeds)
    k = len(diffs)
    mean = sum(diffs) / k
    if k < 2:
        return Paired(seeds, diffs, mean, 0.0, None, None)
    from scipy.stats import t

    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (k - 1))
    half = float(t.ppf((1 + confidence) / 2, k - 1)) * std / math.sqrt(k)
    return Paired(seeds, diffs, mean, std, mean - half, mean + half)
