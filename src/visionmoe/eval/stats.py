"""Statistics that decide: seed-paired differences with a confidence interval and a verdict.

A comparison of two methods over the same seeds (same pre-training data order, same
fine-tuning subsets) is a set of paired differences ``d_i = a_i - b_i``. The mean difference
gets a two-sided Student-t interval, ``mean ± t_{0.975, n-1} * sd / sqrt(n)``; the verdict
against a claimed direction (``a > b`` for ``direction=+1``) is ``reproduced`` when the interval
excludes 0 on that side, ``refuted`` when it excludes 0 on the other, and ``not resolved``
otherwise (always with a single seed: no interval can be computed from one pair).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["paired_difference", "format_difference"]


def paired_difference(a: Sequence[float], b: Sequence[float], *, direction: int = 1,
                      confidence: float = 0.95) -> dict:
    """``{"mean", "std", "n", "ci": [lo, hi] | None, "verdict"}`` of ``a - b`` paired by index."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples need the same, non-zero length; got {len(a)} and {len(b)}")
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 (a > b claimed) or -1 (a < b), got {direction}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n == 1:
        return {"mean": mean, "std": None, "n": 1, "ci": None, "verdict": "not resolved (1 seed)"}
    from scipy.stats import t

    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if direction * lo > 0 and direction * hi > 0:
        verdict = "reproduced"
    elif direction * lo < 0 and direction * hi < 0:
        verdict = "refuted"
    else:
        verdict = "not resolved"
    return {"mean": mean, "std": sd, "n": n, "ci": [lo, hi], "verdict": verdict}


def format_difference(r: dict, digits: int = 3) -> str:
    """``"+0.012 [-0.004, +0.028] (3 seeds): not resolved"``; one seed prints no interval."""
    if r["ci"] is None:
        return f"{r['mean']:+.{digits}f} (1 seed, no interval): {r['verdict']}"
    lo, hi = r["ci"]
    return f"{r['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] ({r['n']} seeds): {r['verdict']}"
