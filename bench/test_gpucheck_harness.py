"""bench/gpucheck/harness.py on the CPU: interleaved rounds, the statistics of a method, a failing method."""
from __future__ import annotations

import time

import torch
from gpucheck.harness import bench, cuda_healthy, extra_peak_mib, time_once

CPU = torch.device("cpu")


def test_time_once_measures_the_call_in_ms():
    assert 15.0 <= time_once(lambda: time.sleep(0.02), CPU) < 1000.0


def test_bench_interleaves_the_methods_round_by_round():
    calls: list[str] = []
    out = bench({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, CPU, rounds=3, warmup=2)
    # warm-up: a a, b b (the last one timed to size the rounds); then a b a b a b
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    for name in ("a", "b"):
        assert out[name]["n"] == 3 and out[name]["min_ms"] <= out[name]["median_ms"]
        assert set(out[name]) == {"median_ms", "min_ms", "n", "warmup_ms"}


def test_bench_median_and_min_of_known_times():
    times = iter([0.0, 0.03, 0.01, 0.02])  # warm-up, then three rounds: median 0.02 s, min 0.01 s
    out = bench({"s": lambda: time.sleep(next(times))}, CPU, rounds=3, warmup=1)["s"]
    assert 8.0 <= out["min_ms"] < out["median_ms"] < 30.0 and out["n"] == 3


def test_bench_sizes_the_rounds_to_the_slowest_method():
    out = bench({"slow": lambda: time.sleep(0.01)}, CPU, rep_ms=1e6, min_rounds=2, max_rounds=4)
    assert out["slow"]["n"] == 4  # clamped to max_rounds
    out = bench({"slow": lambda: time.sleep(0.01)}, CPU, rep_ms=0.0, min_rounds=2, max_rounds=4)
    assert out["slow"]["n"] == 2  # clamped to min_rounds


def test_a_failing_method_is_dropped_and_the_others_timed():
    state = {"n": 0}

    def flaky():
        state["n"] += 1
        if state["n"] > 1:  # fine in the warm-up, fails in the first round
            raise RuntimeError("boom")

    out = bench({"flaky": flaky, "ok": lambda: None, "broken": lambda: 1 / 0}, CPU, rounds=3)
    assert out["flaky"] == {"error": "RuntimeError: boom"}
    assert out["broken"]["error"].startswith("ZeroDivisionError")
    assert out["ok"]["n"] == 3


def test_memory_and_context_checks_are_no_ops_on_a_cpu():
    ran = []
    assert extra_peak_mib(lambda: ran.append(1), CPU) is None and ran == [1]
    assert cuda_healthy(CPU)
