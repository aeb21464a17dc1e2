"""bench/gpucheck/agreement.py: errors relative to the largest reference value, and the records of checks."""
from __future__ import annotations

import math

import torch
from gpucheck.agreement import check_record, close, diag_err, rel_to_max


def test_rel_to_max_is_relative_to_the_largest_reference():
    ref = torch.tensor([100.0, 1.0, 0.0])
    got = torch.tensor([100.0, 2.0, 0.5])  # the small entries are far off, but small next to 100
    assert rel_to_max(got, ref) == 0.01
    assert rel_to_max(torch.tensor([math.nan, 0.0, 0.0]), ref) == math.inf


def test_close_combines_relative_and_scaled_absolute_tolerance():
    ref = torch.tensor([1000.0, 1.0, 0.0])
    ok, err = close(torch.tensor([1000.5, 1.0, 0.005]), ref, rtol=1e-3)  # 0.005 <= 1e-5 * 1000
    assert ok and err == 0.0005
    ok, _ = close(torch.tensor([1000.0, 1.01, 0.0]), ref, rtol=1e-3, atol_rel=0.0)
    assert not ok
    assert close(torch.tensor([math.inf, 1.0, 0.0]), ref, rtol=1.0) == (False, math.inf)


def test_diag_err_floors_exactly_zero_references():
    ref = {"w": torch.tensor([2.0, 4.0]), "zero_bias": torch.zeros(2)}
    got = {"w": torch.tensor([2.0, 4.2]), "zero_bias": torch.tensor([1e-15, 0.0])}  # rounding noise around 0
    assert math.isclose(diag_err(got, ref), 0.05, rel_tol=1e-6)  # 4.2 in float32
    assert diag_err({"w": got["w"]}, ref) == math.inf  # a tensor missing


def test_check_record():
    assert check_record("x vs ref", 1e-9, 1e-8, per_tensor=[1e-9]) == {
        "name": "x vs ref", "max_rel_err": 1e-9, "tol": 1e-8, "ok": True, "per_tensor": [1e-9]}
    assert check_record("x", 2.0, 1.0)["ok"] is False
