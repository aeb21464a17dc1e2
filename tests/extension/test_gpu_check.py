"""The GPU check (bench/gpu_check.sh, gpu_check.py, sanitize_kernels.py) in its dry mode on the CPU, so
that the script the scarce GPU runs cannot rot: every section on tiny shapes, the kernel sanitizer
script, the shell driver's step bookkeeping and summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402
import sanitize_kernels  # noqa: E402
from gpucheck.sections.linear import linear_winners  # noqa: E402
from gpucheck.summary import print_summary  # noqa: E402

from fastsel import EXTENSION  # noqa: E402

needs_extension = pytest.mark.skipif(not EXTENSION.loaded, reason=f"fastsel._C not loaded: {EXTENSION.reason}")


def test_linear_winners_and_rules():
    def cfg(cls, times, bad=()):
        return {"dtype": "bf16", "class": cls, "variants": {
            v: {"median_ms": t, "check_ok": v not in bad} for v, t in times.items()}}

    configs = [
        cfg("T<=256|B<=32|OI<=1M", {"bmm": 2.0, "wmma": 1.0, "pipelined": 1.5}),
        cfg("T<=256|B<=32|OI<=1M", {"bmm": 2.0, "wmma": 1.2, "pipelined": 1.0}),
        cfg("T<=256|B<=32|OI<=1M", {"bmm": 2.0, "wmma": 1.0, "pipelined": 1.1}),
        cfg("T>256|B>32|OI>1M", {"bmm": 3.0, "wmma": 1.0, "pipelined": 2.0}, bad=("wmma",)),  # fastest but wrong
    ]
    winners, rules = linear_winners(configs, "9.0", "H200")
    assert winners["bf16"]["T<=256|B<=32|OI<=1M"]["backend"] == "wmma"
    assert winners["bf16"]["T>256|B>32|OI>1M"]["backend"] == "pipelined"  # a failed check never wins
    assert winners["bf16"]["T>256|B>32|OI>1M"]["failed_checks"] == ["wmma"]
    rule = next(r for r in rules if r["when"]["T"] == "T<=256")
    assert rule["when"] == {"capability": "9.0", "dtype": ["bf16"], "T": "T<=256", "B": "B<=32", "OI": "OI<=1M"}
    assert rule["backend"] == "wmma" and "H200" in rule["why"]
    assert all(set(r) == {"when", "backend", "why"} for r in rules)


def test_summary_reads_steps_and_a_missing_json(tmp_path, capsys):
    (tmp_path / "steps.tsv").write_text("env\tok\t3\nbuild\tFAILED (rc 1, build failed)\t40\n")
    print_summary(tmp_path)
    out = capsys.readouterr().out
    assert "FAILED (rc 1, build failed)" in out and "no " in out and "gpu_check.json" in out


@needs_extension
def test_sanitize_kernels_cpu(capsys):
    assert sanitize_kernels.main(["--device", "cpu"]) == 0
    assert " 0 failed" in capsys.readouterr().out


@needs_extension
def test_gpu_check_dry_every_section(tmp_path):
    rc = gpu_check.main(["--dry", "--out", str(tmp_path), "--budget-s", "150"])
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {name: s["status"] for name, s in data["sections"].items()}
    assert statuses == dict.fromkeys(gpu_check.SECTIONS, "ok"), {n: data["sections"][n].get("error") for n in statuses}
    assert rc == 0
    lin = data["sections"]["linear"]
    assert set(lin["timed"]) >= {"bmm", "kernel"} and not lin["checks_failed"]
    assert data["linear_winners"]["rules"]
    fisher = data["sections"]["fisher"]
    assert fisher["checks"]["fastsel_fp32_vs_loop"]["ok"]
    for peer in ("loop", "opacus", "vmap"):
        assert "median_ms" in fisher["methods"][peer], fisher["methods"][peer]
    assert data["sections"]["variability"]["check"]["ok"]
    assert "fisher: fastsel / train step" in data["targets"]


def test_broken_cuda_context_restarts_the_rest_in_a_fresh_process(tmp_path):
    """After a section breaks the CUDA context (faked here), the remaining sections run in a new process that
    keeps the JSON so far; the exit code says a section failed."""
    env = {**os.environ, "GPU_CHECK_FAKE_BROKEN": "gemm", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry", "--out", str(tmp_path),
                           "--sections", "gemm,error", "--budget-s", "100"], capture_output=True, text=True, env=env,
                          timeout=300)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["resumed"] == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert data["sections"]["env"]["status"] == "ok"
    assert data["sections"]["gemm"]["status"] == "failed (CUDA context broken)"
    assert data["sections"]["error"]["status"] == "ok"
    assert proc.returncode == 1
    assert "gpu_check summary" in proc.stdout


def test_gpu_check_sh_dry_steps(tmp_path):
    """The driver: steps recorded, GPU-only ones skipped, summary printed last (bench left out: above)."""
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry", "--steps", "env,build,tests,racecheck"],
                          capture_output=True, text=True, env=env, timeout=300)
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == ["env", "build", "tests", "racecheck"]
    status = {s[0]: s[1] for s in steps}
    assert status["tests"].startswith("skipped") and status["racecheck"] == "skipped (no GPU)"
    assert status["env"] == "ok", proc.stdout[-3000:]
    if EXTENSION.loaded:
        assert status["build"] == "ok" and proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1] in ("all steps passed", "FAILED steps: build")
    assert "gpu_check summary" in proc.stdout
