"""The study's statistics over seeds: mean and sample std, Welch's two-sided t-test between strategies, the
paired comparison by seed (paired t-test), the exact sign test, and the verdict label that reads them.

The tests are scipy's (``ttest_ind(equal_var=False)``, ``ttest_rel``, ``binomtest``); what is kept here is what
scipy does not decide for the study: groups too small to test give None, and groups without spread (every seed
gave the same value), where scipy returns NaN, give p = 1 for equal means and p = 0 otherwise.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

from scipy.stats import binomtest, ttest_ind, ttest_rel

ALPHA = 0.05  # "beyond seed noise": Welch p below this


def mean_std(values: Sequence[float]) -> tuple[float, float | None, int]:
    """(mean, sample std (ddof 1; None for n < 2), n)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, Any] | None:
    """Welch's two-sided t-test of mean(a) != mean(b): {"t", "df" (Welch-Satterthwaite), "p"}; None when a
    group has fewer than 2 values.

    Both groups without spread: t = ±inf or 0, df None, p = 1 for equal means and 0 otherwise.
    """
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        ma, mb = statistics.fmean(a), statistics.fmean(b)
        return {"t": math.copysign(math.inf, ma - mb) if ma != mb else 0.0, "df": None, "p": 1.0 if ma == mb else 0.0}
    r = ttest_ind(a, b, equal_var=False)
    return {"t": float(r.statistic), "df": float(r.df), "p": float(r.pvalue)}


def paired(a: Mapping[Any, float], b: Mapping[Any, float]) -> dict[str, Any] | None:
    """Paired comparison over the seeds both have: mean difference a - b, wins/ties/losses of a, paired
    t-test p (None for n < 2; 1 or 0 when every difference is the same). None when no seed is shared."""
    seeds = sorted(set(a) & set(b), key=str)
    if not seeds:
        return None
    xa, xb = [float(a[s]) for s in seeds], [float(b[s]) for s in seeds]
    d = [x - y for x, y in zip(xa, xb)]
    out: dict[str, Any] = {"n": len(d), "mean_diff": statistics.fmean(d), "wins": sum(x > 0 for x in d),
                           "ties": sum(x == 0 for x in d), "losses": sum(x < 0 for x in d), "p": None}
    if len(d) >= 2:
        if statistics.stdev(d) == 0:
            out["p"] = 1.0 if d[0] == 0 else 0.0
        else:
            out["p"] = float(ttest_rel(xa, xb).pvalue)
    return out


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties dropped): scipy's binomial test of wins out of wins + losses at 1/2."""
    return float(binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0


def verdict_label(a: str, b: str, diff: float, p: float | None, alpha: float = ALPHA) -> str:
    """Which of a, b is better "beyond seed noise" (p < alpha; the sign of diff = mean a - mean b decides)."""
    if p is None:
        return "no test (n < 2)"
    if p < alpha:
        return f"{a if diff > 0 else b} better, beyond seed noise"
    return "within seed noise"
