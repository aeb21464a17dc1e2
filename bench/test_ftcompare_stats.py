"""bench/ftcompare/stats.py: the tests against scipy, and scipy against values computed independently."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from ftcompare.report import fmt_ms
from ftcompare.results import compare
from ftcompare.stats import mean_std, paired, welch


def test_welch_and_paired_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.81, 0.83, 0.80, 0.84], [0.78, 0.79, 0.74]
    w = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert math.isclose(w["t"], ref.statistic, rel_tol=1e-9) and math.isclose(w["p"], ref.pvalue, rel_tol=1e-7)
    pa = {0: 0.81, 1: 0.83, 2: 0.80}
    pb = {0: 0.79, 1: 0.80, 2: 0.80, 3: 0.5}  # seed 3 has no partner
    pr = paired(pa, pb)
    ref = stats.ttest_rel([0.81, 0.83, 0.80], [0.79, 0.80, 0.80])
    assert pr["n"] == 3 and (pr["wins"], pr["ties"], pr["losses"]) == (2, 1, 0)
    assert math.isclose(pr["p"], ref.pvalue, rel_tol=1e-7) and math.isclose(pr["mean_diff"], 0.05 / 3, rel_tol=1e-9)
    # degenerate cases
    assert welch([0.8], [0.7, 0.6]) is None
    assert welch([0.8, 0.8], [0.8, 0.8])["p"] == 1.0
    assert welch([0.8, 0.8], [0.7, 0.7])["p"] == 0.0
    assert paired({0: 0.8}, {0: 0.7})["p"] is None
    assert paired({0: 0.8}, {1: 0.7}) is None


def test_mean_std():
    m, s, n = mean_std([0.8, 0.9, 1.0])
    assert math.isclose(m, 0.9) and math.isclose(s, 0.1) and n == 3
    assert mean_std([0.5])[1] is None and fmt_ms([0.5]) == "0.500 (n=1)" and fmt_ms([]) == "-"
    assert fmt_ms([0.8, 0.9, 1.0]) == "0.900 ± 0.100 (n=3)"


# -- scipy's tests against values computed without scipy ----------------------------------------------


def student_t_two_sided_p(t: float, df: float, points: int = 200_001) -> float:
    """2 P(T > |t|) for Student's t with ``df`` (not necessarily whole) degrees of freedom, by Simpson's rule
    on the density over [0, |t|]: 1 - 2 * integral (the density is smooth there, so this is exact to ~1e-12)."""
    x = np.linspace(0.0, abs(t), points)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    f = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
    h = x[1] - x[0]
    integral = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return float(1.0 - 2.0 * integral)


def test_the_reference_integral_is_right_where_a_closed_form_exists():
    # df = 2: P(|T| > t) = 1 - t / sqrt(t^2 + 2); df = 1 (Cauchy): 1 - 2 atan(t) / pi
    for t in (0.3, 1.0, 2.5, 7.0):
        assert student_t_two_sided_p(t, 2.0) == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-10)
        assert student_t_two_sided_p(t, 1.0) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-10)


@pytest.mark.parametrize("a, b", [
    ([0.81, 0.83, 0.80, 0.84], [0.78, 0.79, 0.74]),
    ([0.61, 0.58, 0.66], [0.52, 0.60, 0.49, 0.55, 0.57]),
    ([0.10, 0.05, 0.12], [0.11, 0.07, 0.02]),  # unequal spreads: a non-integer df
])
def test_welch_against_the_hand_formula(a, b):
    xa, xb = np.asarray(a), np.asarray(b)
    se_a, se_b = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    t = (xa.mean() - xb.mean()) / math.sqrt(se_a + se_b)
    df = (se_a + se_b) ** 2 / (se_a ** 2 / (xa.size - 1) + se_b ** 2 / (xb.size - 1))  # Welch-Satterthwaite
    w = welch(a, b)
    assert w["t"] == pytest.approx(t, rel=1e-12) and w["df"] == pytest.approx(df, rel=1e-12)
    assert w["p"] == pytest.approx(student_t_two_sided_p(t, df), rel=1e-8)


def test_paired_against_the_closed_form_of_three_seeds():
    # n = 3 seeds: df = 2, where the two-sided p is 1 - |t| / sqrt(t^2 + 2)
    a = {0: 0.81, 1: 0.83, 2: 0.80, 7: 0.99}
    b = {0: 0.79, 1: 0.80, 2: 0.805}
    d = np.array([0.81 - 0.79, 0.83 - 0.80, 0.80 - 0.805])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    pr = paired(a, b)
    assert pr["n"] == 3 and (pr["wins"], pr["ties"], pr["losses"]) == (2, 0, 1)
    assert pr["p"] == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2), rel=1e-10)
    # n = 5: df = 4, by the integral
    a5, b5 = dict(enumerate([0.5, 0.6, 0.55, 0.7, 0.65])), dict(enumerate([0.45, 0.62, 0.5, 0.6, 0.6]))
    d5 = np.array([a5[i] - b5[i] for i in range(5)])
    t5 = d5.mean() / (d5.std(ddof=1) / math.sqrt(5))
    assert paired(a5, b5)["p"] == pytest.approx(student_t_two_sided_p(t5, 4.0), rel=1e-8)


def test_no_spread_is_decided_without_scipy():
    # scipy gives NaN here; the study's rule: equal means p = 1, different means p = 0
    assert welch([0.8, 0.8, 0.8], [0.7, 0.7])["t"] == math.inf
    assert welch([0.7, 0.7], [0.8, 0.8, 0.8])["t"] == -math.inf
    assert paired({0: 0.5, 1: 0.75}, {0: 0.25, 1: 0.5})["p"] == 0.0  # every difference exactly 0.25: no spread
    assert paired({0: 0.8, 1: 0.9}, {0: 0.8, 1: 0.9})["p"] == 1.0


# p-values of the committed study results as the hand-written tests (before scipy's) computed them:
# (Welch p, paired p) per comparison
COMMITTED = {
    ("finetune_compare_sst2.json", "sst2", "fisher-top-1", "position-top-1"): (0.11164393333660828, 0.10631108992737406),
    ("finetune_compare_sst2.json", "sst2", "fisher-top-3", "random-3"): (0.8910322920284968, 0.8114381916835881),
    ("finetune_compare_mrpc_rte.json", "mrpc", "fisher-top-1", "position-top-1"): (0.22836595716287905, 0.017436784875315525),
    ("finetune_compare_mrpc_rte.json", "rte", "fisher-top-1", "random-1"): (0.2106166579816689, 0.04881026878865771),
    ("finetune_compare_mrpc_rte.json", "rte", "fisher-top-1", "position-top-1"): (1.0, 1.0),
    ("finetune_compare_cola.json", "cola", "fisher-top-1", "random-1"): (0.7303789683902635, 0.488894605001421),
    ("finetune_compare_cola.json", "cola", "fisher-top-3", "position-top-3"): (1.0, 1.0),
}


@pytest.mark.parametrize("key", list(COMMITTED), ids=lambda k: f"{k[1]}-{k[2]}-vs-{k[3]}")
def test_committed_results_give_the_numbers_of_the_hand_written_tests(key):
    name, task, a, b = key
    agg = json.loads((Path(__file__).resolve().parent / name).read_text())
    c = compare(agg, task, a, b)
    welch_p, paired_p = COMMITTED[key]
    assert c["welch"]["p"] == pytest.approx(welch_p, rel=1e-10, abs=1e-15)
    assert c["paired"]["p"] == pytest.approx(paired_p, rel=1e-10, abs=1e-15)
