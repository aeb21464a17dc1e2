"""Ranking confidence from K groups of the data, computed in the same single pass.

The groups (:func:`group_unit`): whole batches, batch ``b`` of the pass's global schedule in group ``b mod K``,
when every group gets at least :data:`MIN_BATCHES_PER_GROUP` batches; else single examples, example ``i`` in group
``i mod K`` of its global index. Both are deterministic and independent of sharding and resume; batch groups
depend on the schedule (batch size, bucketing, seed), and cost nothing per batch: a batch adds to one group's
accumulators, as many as without groups, where groups of examples add to every group's in every batch. Each
consumer keeps one accumulator per group (Fisher: per-group squared-gradient sums of the blocks, whose sum is the
total; variability: per-group class statistics beside the totals), and nothing per example. From the groups:

* the two halves A = groups {0..K/2-1} and B = the rest are independent samples of the data: the Kendall
  tau-b between their layer scores and the agreement |top_k(A) & top_k(B)| / k (k = 1..3);
* the delete-one-group jackknife: theta_(g) = the score without group g, the jackknife standard error
  se = sqrt((K-1)/K * sum_g (theta_(g) - mean_g theta_(g))^2), and the score interval theta +- t se with t
  the two-sided 95% quantile of Student's t with K-1 degrees of freedom (3.18 for K = 4: the jackknife
  variance has K-1 of them, and the normal 1.96 covered 84% instead of 95% in docs/sample_size.md);
  theta: the score on all the data; and the jackknife bias estimate (K-1) (mean_g theta_(g) - theta), which
  flags scores (the variability ratio from few examples) that sit off their large-sample value;
* the rank interval of layer l follows from the score intervals: its best possible rank is 1 + the number
  of layers whose interval lies entirely better than l's, its worst L - the number entirely worse.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from scipy.stats import t as student_t

__all__ = ["DEFAULT_GROUPS", "LEVEL", "MIN_BATCHES_PER_GROUP", "GROUP_UNITS", "check_confidence_unit", "group_unit", "method",
           "group_ids", "batch_groups",
           "halves", "kendall_tau_b", "topk_agreement", "interval_quantile", "jackknife", "jackknife_bias",
           "rank_intervals", "ranking_confidence", "confidence_from_groups", "format_confidence"]

DEFAULT_GROUPS = 4
LEVEL = 0.95  # two-sided coverage of the score intervals
MIN_BATCHES_PER_GROUP = 2  # fewer batches per group: groups of examples (a group of one batch is a poor sample)
GROUP_UNITS = ("batches", "examples")


def check_confidence_unit(requested: str) -> None:
    """One-line ValueError unless ``requested`` is auto or one of GROUP_UNITS (``--confidence-unit``)."""
    if requested != "auto" and requested not in GROUP_UNITS:
        raise ValueError(f"fastsel: --confidence-unit must be auto, {' or '.join(GROUP_UNITS)}, got {requested!r}")


def group_unit(num_examples: int, batch_size: int, k: int, requested: str = "auto") -> str:
    """What the K groups are made of (``--confidence-unit``): ``requested`` unless "auto"; auto: "batches" when
    the schedule has at least MIN_BATCHES_PER_GROUP x K batches (``num_examples / batch_size`` is the fewest a
    schedule of at most ``batch_size`` examples per batch can have), else "examples"."""
    check_confidence_unit(requested)
    if requested in GROUP_UNITS:
        return requested
    return "batches" if num_examples >= MIN_BATCHES_PER_GROUP * k * batch_size else "examples"


def method(unit: str) -> str:
    """scores.json ``ranking_confidence.method``."""
    if unit not in GROUP_UNITS:
        raise ValueError(f"fastsel: the confidence groups are made of {GROUP_UNITS}, not {unit!r}")
    return f"jackknife over K groups of {unit}"


def interval_quantile(k: int) -> float:
    """The two-sided LEVEL quantile of Student's t with K-1 degrees of freedom (K >= 2 groups)."""
    if k < 2:
        raise ValueError(f"fastsel: the jackknife needs at least 2 groups, got {k}")
    return float(student_t.ppf(0.5 + LEVEL / 2, k - 1))


def group_ids(index: Any, k: int) -> Any:
    """The group of each global example index (tensor or array): index mod K."""
    return index % k


def batch_groups(batch: Any, k: int, index: Any = None) -> Any:
    """(B,) the group of each example of a batch: its ``group`` entry (the streamed pass's: whole batches, or index
    mod K), else ``index`` (default ``batch["index"]``) mod K."""
    if "group" in batch:
        return batch["group"]
    return group_ids(batch["index"] if index is None else index, k)


def halves(k: int) -> tuple[list[int], list[int]]:
    return list(range(k // 2)), list(range(k // 2, k))


def kendall_tau_b(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b between two score vectors (ties handled as scipy.stats.kendalltau); nan if undefined."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(x)
    conc = disc = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif dx == dy:
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom > 0 else float("nan")


def ranking_order(scores: Sequence[float], higher_is_better: bool) -> list[int]:
    sign = -1.0 if higher_is_better else 1.0
    return sorted(range(len(scores)), key=lambda l: (sign * scores[l], l))


def topk_agreement(a: Sequence[float], b: Sequence[float], k: int, higher_is_better: bool) -> float:
    """|top_k(a) & top_k(b)| / k (ties broken by layer index, as LayerScores.ranking)."""
    k = min(k, len(a))
    if k == 0:
        return float("nan")
    return len(set(ranking_order(a, higher_is_better)[:k]) & set(ranking_order(b, higher_is_better)[:k])) / k


def jackknife(full: Sequence[float], leave_out: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    """Per layer (theta - t se, theta + t se) from the K delete-one-group scores leave_out[g][l] (K, L)."""
    th = np.asarray(leave_out, dtype=np.float64)  # (K, L)
    k = th.shape[0]
    se = np.sqrt((k - 1) / k * ((th - th.mean(0)) ** 2).sum(0))
    q = interval_quantile(k)
    return [(float(f - q * s), float(f + q * s)) for f, s in zip(full, se)]


def jackknife_bias(full: Sequence[float], leave_out: Sequence[Sequence[float]]) -> list[float]:
    """Per layer the jackknife bias estimate (K-1) (mean_g theta_(g) - theta) from leave_out (K, L)."""
    th = np.asarray(leave_out, dtype=np.float64)
    k = th.shape[0]
    return [float((k - 1) * (m - f)) for f, m in zip(full, th.mean(0))]


def rank_intervals(intervals: Sequence[tuple[float, float]], higher_is_better: bool) -> list[tuple[int, int]]:
    """Best and worst rank (1 = best) of each layer consistent with the score intervals."""
    L = len(intervals)
    out = []
    for lo, hi in intervals:
        if higher_is_better:
            surely_better = sum(1 for lo2, _ in intervals if lo2 > hi)
            surely_worse = sum(1 for _, hi2 in intervals if hi2 < lo)
        else:
            surely_better = sum(1 for _, hi2 in intervals if hi2 < lo)
            surely_worse = sum(1 for lo2, _ in intervals if lo2 > hi)
        out.append((1 + surely_better, L - surely_worse))
    return out


def ranking_confidence(full: Sequence[float], half_a: Sequence[float], half_b: Sequence[float],
                       leave_out: Sequence[Sequence[float]], higher_is_better: bool,
                       unit: str = "examples") -> dict[str, Any]:
    """The ``ranking_confidence`` object of scores.json from the scores on all data, on the two halves, and
    without each group (``unit``: what the groups are made of, :func:`group_unit`)."""
    k = len(leave_out)
    score_iv = jackknife(full, leave_out)
    bias = jackknife_bias(full, leave_out)
    rank_iv = rank_intervals(score_iv, higher_is_better)
    tau = kendall_tau_b(half_a, half_b)
    return {
        "method": method(unit),
        "groups": k,
        "halves": [halves(k)[0], halves(k)[1]],
        "kendall_tau_halves": None if math.isnan(tau) else tau,
        "topk_agreement_halves": {str(t): topk_agreement(half_a, half_b, t, higher_is_better) for t in (1, 2, 3) if t <= len(full)},
        "interval": (f"score +- t({0.5 + LEVEL / 2:g}, {k - 1} dof) = {interval_quantile(k):.3f} jackknife standard errors; "
                     "rank interval: ranks consistent with the score intervals"),
        "layers": [{"layer": l, "score_interval": [lo, hi], "rank_interval": [r0, r1], "jackknife_bias": b}
                   for l, ((lo, hi), (r0, r1), b) in enumerate(zip(score_iv, rank_iv, bias))],
    }


def confidence_from_groups(full: Sequence[float], scores_of: Callable[[list[int]], Sequence[float]], k: int,
                           higher_is_better: bool, unit: str = "examples") -> dict[str, Any]:
    """ranking_confidence with ``scores_of(groups)`` = the layer scores of the union of those groups.

    A subset whose scores cannot be computed (e.g. a class with fewer than 2 examples in a half) gives
    {"method", "groups", "unavailable": reason} instead.
    """
    a, b = halves(k)
    try:
        half_a, half_b = list(scores_of(a)), list(scores_of(b))
        leave_out = [list(scores_of([g for g in range(k) if g != d])) for d in range(k)]
        values = [*half_a, *half_b, *(v for row in leave_out for v in row)]
        if any(v is None or not math.isfinite(v) for v in values):
            raise ValueError("non-finite scores on a subset of the groups")
    except ValueError as exc:
        return {"method": method(unit), "groups": k, "unavailable": f"too few examples per group: {exc}"}
    return ranking_confidence(full, half_a, half_b, leave_out, higher_is_better, unit)


def format_confidence(conf: dict[str, Any]) -> str:
    """One line for the table printed by ``fastsel score``."""
    if "unavailable" in conf:
        return f"ranking confidence ({conf['groups']} groups): unavailable ({conf['unavailable']})"
    tau = conf["kendall_tau_halves"]
    topk = ", ".join(f"top-{k} {v:.2f}" for k, v in conf["topk_agreement_halves"].items())
    tau_txt = "n/a" if tau is None else f"{tau:.3f}"
    return f"ranking confidence ({conf['method']}, K={conf['groups']}): Kendall tau between halves {tau_txt}; {topk} agreement"
