"""bench/ftcompare/results.py: records of runs, comparisons, verdicts and their pooling."""
from __future__ import annotations

import math

import pytest
from ftcompare.report import render_summary
from ftcompare.results import (
    compare,
    merge_results,
    pooled_verdicts,
    record_from_run,
    verdicts,
)
from ftcompare.stats import sign_test
from ftcompare_fakes import agg_of, fake_plan, fake_results


def test_record_from_run():
    rec = record_from_run(fake_results(0.9, "full", taus={"1": 0.8, "2": 0.6}), fake_plan(range(6)), 123.0)
    assert rec["metric"] == 0.9 and rec["metric_name"] == "accuracy" and rec["best_epoch"] == 3
    assert rec["tuned_blocks"] == [0, 1, 2, 3, 4, 5] and rec["head_layer"] == 5 and rec["wall_s"] == 123.0
    assert rec["rank_taus"] == {"1": 0.8, "2": 0.6} and rec["cache_seconds"] == 5.0 and rec["peak_mb"] == 800.0
    assert len(rec["epoch_metrics"]) == 3 and rec["eval_seconds"] == 2.0
    rec = record_from_run(fake_results(0.7, "random-1-s2"), fake_plan([2]), None)
    assert rec["strategy_run"] == "random-1-s2" and "rank_taus" not in rec and rec["tuned_blocks"] == [2]


def test_verdicts():
    agg = agg_of({
        "fisher-top-1": {0: 0.85, 1: 0.86, 2: 0.855},
        "position-top-1": {0: 0.80, 1: 0.81, 2: 0.805},   # clearly worse
        "random-1": {0: 0.70, 1: 0.90, 2: 0.86},          # noisy
        "fisher-top-3": {0: 0.80},                        # one seed only
        "position-top-3": {0: 0.81, 1: 0.82},
    }, blocks={"fisher-top-1": [4], "position-top-1": [5], "random-1": [4], "fisher-top-3": [3, 4, 5], "position-top-3": [3, 4, 5]})
    vs = {(c["a"], c["b"]): c for c in verdicts(agg, ["sst2"])}
    assert set(vs) == {("fisher-top-1", "position-top-1"), ("fisher-top-1", "random-1"), ("fisher-top-3", "position-top-3")}
    c = vs[("fisher-top-1", "position-top-1")]
    assert c["label"] == "fisher-top-1 better, beyond seed noise" and c["welch"]["p"] < 0.05
    assert math.isclose(c["diff"], 0.05) and c["paired"]["wins"] == 3 and c["same_blocks"] == 0
    c = vs[("fisher-top-1", "random-1")]
    assert c["label"] == "within seed noise" and c["same_blocks"] == 3
    assert vs[("fisher-top-3", "position-top-3")]["label"] == "no test (n < 2)"
    worse = compare(agg_of({"a": {0: 0.5, 1: 0.51}, "b": {0: 0.8, 1: 0.81}}), "sst2", "a", "b")
    assert worse["label"] == "b better, beyond seed noise"


def test_sign_test_is_the_exact_binomial_tail_and_pooling_counts_seeds():
    def exact(w, l):  # 2 P(W <= min(w, l)), W ~ Binomial(w + l, 1/2), capped at 1
        n = w + l
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(w, l) + 1)) / 2 ** n)

    for w, l in ((8, 2), (3, 7), (5, 5), (0, 4), (10, 0), (1, 0)):
        assert sign_test(w, l) == pytest.approx(exact(w, l), rel=1e-12)
    assert sign_test(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096, rel=1e-12)  # the pooled MRPC..CoLA case
    assert sign_test(0, 0) == 1.0
    a = agg_of({"fisher-top-1": {0: 0.81, 1: 0.80, 2: 0.82}, "position-top-1": {0: 0.79, 1: 0.80, 2: 0.80}},
               {"fisher-top-1": [4], "position-top-1": [5]})
    b = agg_of({"fisher-top-1": {0: 0.10, 1: 0.05}, "position-top-1": {0: 0.05, 1: 0.07}},
               {"fisher-top-1": [4], "position-top-1": [5]}, task="cola")
    pooled = pooled_verdicts(verdicts(merge_results([a, b]), ["sst2", "cola"]))
    assert len(pooled) == 1
    k = pooled[0]
    assert (k["a"], k["b"], k["tasks"]) == ("fisher-top-1", "position-top-1", ["sst2", "cola"])
    assert (k["wins"], k["ties"], k["losses"]) == (3, 1, 1) and k["p"] == pytest.approx(sign_test(3, 1))
    md = render_summary(merge_results([a, b]), ["sst2", "cola"], ["fisher-top-1", "position-top-1"])
    assert "| fisher-top-1 vs position-top-1 | sst2, cola | 3/1/1 |" in md
