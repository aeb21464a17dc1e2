"""bench/gpucheck/run.py: a section's status, time and error are saved whatever it does; a resumed run keeps
the sections already measured."""
from __future__ import annotations

import json

import torch
from gpucheck.run import Run

CPU = torch.device("cpu")


def test_sections_are_recorded_ok_failed_and_with_their_own_status(tmp_path):
    run = Run(tmp_path, dry=True, device=CPU, budget_s=60)

    def fine(run, res):
        res["value"] = 3

    def broken(run, res):
        raise ValueError("no")

    def own(run, res):
        res["status"] = "failed (agreement)"

    for name, fn in (("fine", fine), ("broken", broken), ("own", own)):
        run.section(name, fn)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    fine_res, broken_res = data["sections"]["fine"], data["sections"]["broken"]
    assert fine_res["status"] == "ok" and fine_res["value"] == 3 and "deadline" not in fine_res
    assert broken_res["status"] == "failed" and broken_res["error"] == "ValueError: no" and "traceback" in broken_res
    assert data["sections"]["own"]["status"] == "failed (agreement)"
    assert all(isinstance(s["seconds"], float) for s in data["sections"].values())


def test_a_section_past_the_budget_is_skipped(tmp_path):
    run = Run(tmp_path, dry=True, device=CPU, budget_s=-1)
    ran = []
    run.section("late", lambda run, res: ran.append(1))
    assert not ran and run.data["sections"]["late"]["status"] == "skipped (time budget)"


def test_a_faked_broken_context_marks_the_section(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_CHECK_FAKE_BROKEN", "gemm")
    run = Run(tmp_path, dry=True, device=CPU, budget_s=60)
    run.section("gemm", lambda run, res: None)
    res = run.data["sections"]["gemm"]
    assert res["cuda_context_broken"] and res["status"] == "failed (CUDA context broken)"


def test_resume_keeps_the_sections_and_counts_restarts(tmp_path):
    first = Run(tmp_path, dry=True, device=CPU, budget_s=60)
    first.section("env", lambda run, res: res.update(gpu=None))
    again = Run(tmp_path, dry=True, device=CPU, budget_s=60, resume=True)
    assert again.data["resumed"] == 1 and again.data["sections"]["env"]["status"] == "ok"
    assert "resumed" not in Run(tmp_path / "fresh", dry=True, device=CPU, budget_s=60).data
