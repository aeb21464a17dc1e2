"""bench/ftcompare/costs.py: the cost model's fit, estimates and makespan."""
from __future__ import annotations

import math

from ftcompare.costs import estimate_train, fit_costs, makespan, padded_tokens


def test_cost_model_roundtrip():
    c = {"train": 2e-4, "eval": 5e-5, "cache": 3e-5, "overhead": 11.0}
    ref = {"task": "sst2", "name": "full", "num_train": 256, "num_eval": 872, "epochs": 1, "tok_train": 20.0, "tok_eval": 25.0,
           "rank_passes": 2, "rank_examples": 256}
    ref["train_s"] = ref["epochs"] * 256 * 20.0 * c["train"]
    ref["eval_s"] = ref["epochs"] * 872 * 25.0 * c["eval"]
    ref["cache_s"] = (256 * 20.0 + 872 * 25.0) * c["cache"]
    rank_s = 2 * 256 * 20.0 * c["train"]
    ref["wall_s"] = c["overhead"] + ref["train_s"] + ref["eval_s"] + ref["cache_s"] + rank_s
    costs = fit_costs([ref])
    got = costs["by"][("sst2", "full")]
    for k in c:
        assert math.isclose(got[k], c[k], rel_tol=1e-9), k
    sec, src = estimate_train("full", "sst2", 2000, 872, 20.0, 25.0, 3, 4, 256, costs)
    want = 11.0 + 3 * (2000 * 20 * 2e-4 + 872 * 25 * 5e-5) + (2000 * 20 + 872 * 25) * 3e-5 + 4 * 256 * 20 * 2e-4
    assert src == "measured" and math.isclose(sec, want, rel_tol=1e-9)
    assert estimate_train("full", "rte", 2000, 277, 60.0, 60.0, 3, 0, 0, costs)[1] == "other task"
    assert estimate_train("bitfit", "rte", 2000, 277, 60.0, 60.0, 3, 0, 0, costs)[1] == "full's cost (upper bound)"
    assert estimate_train("bitfit", "rte", 2000, 277, 60.0, 60.0, 3, 0, 0, {})[1] == "built-in"


def test_padded_tokens():
    assert padded_tokens([10, 20, 5, 5], 2, 64) == 12.5  # batches (10, 20) -> 20, (5, 5) -> 5
    assert padded_tokens([100, 3], 2, 64) == 64


def test_makespan():
    d = {"s": 10.0, "a": 5.0, "b": 5.0, "c": 20.0}
    deps = {"a": ["s"], "b": ["s"]}
    assert makespan(d, deps, ["s", "a", "b", "c"], 1) == 40.0
    # 2 workers: s | c at 0; a at 10 (s done), b at 15 -> 20; c ends at 20
    assert makespan(d, deps, ["s", "a", "b", "c"], 2) == 20.0
    assert makespan({}, {}, [], 2) == 0.0
