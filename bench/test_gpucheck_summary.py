"""bench/gpucheck/summary.py: the summary table from a gpu_check.json and the driver's steps.tsv."""
from __future__ import annotations

from gpucheck.summary import read_steps, summary_lines


def test_summary_lines_of_a_run():
    data = {
        "dry": False, "gpu": "H200",
        "sections": {
            "gemm": {"status": "ok", "seconds": 3.25, "bf16_tflops": 700.04, "fp32_tflops": 50.0, "copy_gbps": 3900.4},
            "linear": {"status": "failed (agreement)", "seconds": 40.0, "winners": {"bf16": {"T>256": "wmma", "T<=256": "bmm"}},
                       "checks_failed": ["bf16 O768 I768 B8 T128 wmma"]},
            "error": {"status": "failed", "error": "RuntimeError: x", "seconds": 1.0},
            "fisher": {"status": "ok", "methods": {"fastsel": {"median_ms": 12.345, "extra_mib": 10.0}, "loop": {"error": "oom"}}},
            "variability": {"status": "ok", "methods": {"plain_forward": {"tokens_per_s": 1000.4}}},
        },
        "targets": {"fisher: fastsel / train step": {"value": 1.1, "target": "<= 1.2", "met": True},
                    "bf16 error <= 2x bf16-torch": {"value": 3.0, "target": "<= 2", "met": False}},
    }
    lines = summary_lines(data, [("env", "ok", "3")])
    assert lines[0] == "gpu_check summary (H200)" and set(lines[1]) == {"-"}
    text = "\n".join(lines)
    assert "GEMM bf16 700.0 TFLOP/s, fp32 50.0 TFLOP/s, copy 3900 GB/s" in text
    assert "linear winners bf16: T<=256: bmm, T>256: wmma" in text
    assert "linear checks FAILED: 1 (first: bf16 O768 I768 B8 T128 wmma)" in text
    assert "failed: RuntimeError: x" in text
    assert "fisher (ms median, extra MiB): fastsel 12.3/10" in text and "loop" not in text.split("fisher (ms")[1].split("\n")[0]
    assert "variability tokens/s: plain_forward 1000" in text
    target_rows = {l.split()[-1] for l in lines if l.startswith(("fisher: fastsel", "bf16 error"))}
    assert target_rows == {"yes", "NO"}


def test_a_dry_run_never_claims_a_target():
    data = {"dry": True, "device": "cpu", "sections": {}, "skipped_no_gpu": ["wmma"],
            "targets": {"t": {"value": 0.5, "target": ">= 1", "met": False}}}
    lines = summary_lines(data)
    assert lines[0] == "gpu_check summary (dry, cpu)"
    assert lines[-1].endswith("(dry)") and "skipped (no GPU): wmma" in lines


def test_read_steps(tmp_path):
    assert read_steps(tmp_path / "missing.tsv") == []
    (tmp_path / "steps.tsv").write_text("env\tok\t3\nbroken line\nbuild\tFAILED (rc 1)\t40\n")
    assert read_steps(tmp_path / "steps.tsv") == [("env", "ok", "3"), ("build", "FAILED (rc 1)", "40")]


def test_summary_of_the_new_steps(tmp_path):
    from gpucheck.summary import present_logs

    data = {"dry": False, "gpu": "H100", "sections": {
        "linear": {"status": "ok", "winners": {"fp16": {"T<=32|B<=8|OI<=1M": "triton"}}, "triton_first_calls_s": 42.0,
                   "skipped_time_budget": ["a", "b"],
                   "backend_table": {"path": "/x/backend_table.json", "rules": 54, "T_classes": ["T<=256", "T<=32", "T>256"],
                                     "dtypes": ["bf16", "fp16", "fp32"]}},
        "fisher_pass": {"status": "ok", "examples": 512, "T": 128, "attention_loaded": {"sdpa": "sdpa", "eager": "eager"},
                        "runs": {"fisher default B32 sdpa graphs=off": {"status": "ok", "pass_s": 1.25, "examples_per_s": 409.6,
                                                                       "scoring_s": 2.5, "wall_s": 4.0, "peak_extra_mib": 900.0,
                                                                       "head": "probe"},
                                 "fisher default B32 sdpa graphs=on": {"status": "skipped: fastsel has no cuda_graphs setting"}},
                        "ratios": {"default/bare scoring B32 sdpa graphs=off": 1.5}}}}
    for f in ("tests_cuda.log", "sanitize_memcheck.log"):
        (tmp_path / f).write_text("x")
    lines = summary_lines(data, logs=present_logs(tmp_path))
    text = "\n".join(lines)
    assert "linear winners fp16: T<=32|B<=8|OI<=1M: triton" in text
    assert "triton first calls (autotune + compile): 42.0 s" in text and "linear configs skipped (time budget): 2" in text
    assert "backend table: 54 measured rules, T classes T<=256, T<=32, T>256, dtypes bf16, fp16, fp32 -> backend_table.json" in text
    row = next(l for l in lines if l.startswith("fisher default B32 sdpa graphs=off"))
    assert row.split()[5:10] == ["1.25", "409.6", "2.5", "4", "900"] and row.endswith("ok, head probe")
    assert any(l.startswith("fisher default B32 sdpa graphs=on") and "no cuda_graphs setting" in l for l in lines)
    assert "ratios: default/bare scoring B32 sdpa graphs=off 1.50" in text
    assert "logs: tests_cuda.log, sanitize_memcheck.log" in text
