"""The backend table written from a GPU check's result: bench/make_backend_table.py's table_from (fp16 rules of
their own once fp16 was timed, an older run's bf16 rules widened to fp16) and the linear section's
write_backend_table (OUT/backend_table.json, with the T<=32 class measured)."""
from __future__ import annotations

import json

import torch
from gpucheck.run import Run
from gpucheck.sections.linear import linear_winners, write_backend_table
from make_backend_table import table_from


def _config(dtype, B, T, O, I, times):
    from fastsel.ops.backend import linear_shape_class

    return {"dtype": dtype, "B": B, "T": T, "O": O, "I": I, "class": "|".join(linear_shape_class(B, T, O, I)),
            "variants": {v: {"median_ms": ms, "check_ok": True} for v, ms in times.items()}}


def _fake_configs():
    configs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for T in (32, 64, 128, 512):
            fast = "triton" if T <= 32 and dtype != "fp32" else "pipelined" if dtype != "fp32" else "bmm"
            times = {"pipelined": 1.0, "wmma": 1.5, "bmm": 1.2, "triton": 1.1}
            times[fast] = 0.5
            configs.append(_config(dtype, 32, T, 768, 768, times))
    return configs


def test_rules_per_dtype_and_class_with_t32_measured():
    winners, rules = linear_winners(_fake_configs(), "9.0", "H100")
    table = table_from({"linear_winners": {"rules": rules}, "gpu": "H100"}, "fake.json")
    by = {(tuple(r["when"]["dtype"]), r["when"]["T"]): r["backend"] for r in table["rules"]}
    assert by[(("fp16",), "T<=32")] == "triton" and by[(("bf16",), "T<=32")] == "triton"
    assert by[(("fp16",), "T<=256")] == "pipelined" and by[(("fp32",), "T<=32")] == "bmm"
    assert all(r["when"]["capability"] == "9.0" for r in table["rules"]) and table["default"] == "bmm"


def test_an_older_run_without_fp16_has_its_bf16_rules_cover_fp16():
    rules = [{"when": {"capability": "9.0", "dtype": ["bf16"], "T": "T<=256", "B": "B<=32", "OI": "OI<=1M"},
              "backend": "pipelined", "why": "x"}]
    table = table_from({"linear_winners": {"rules": rules}}, "old.json")
    assert table["rules"][0]["when"]["dtype"] == ["bf16", "fp16"]


def test_the_linear_section_writes_the_table_into_out(tmp_path):
    run = Run(tmp_path, dry=True, device=torch.device("cpu"), budget_s=60)
    run.data["capability"], run.data["gpu"] = "9.0", "H100"
    _, rules = linear_winners(_fake_configs(), "9.0", "H100")
    run.data["linear_winners"] = {"rules": rules}
    info = write_backend_table(run)
    table = json.loads((tmp_path / "backend_table.json").read_text())
    assert info["rules"] == len(table["rules"]) == len(rules)
    assert info["T_classes"] == ["T<=256", "T<=32", "T>256"] and info["dtypes"] == ["bf16", "fp16", "fp32"]
    run.data["linear_winners"] = {"rules": []}
    assert "error" in write_backend_table(run)
