"""bench/gpu_check.sh's time budget: the per-step estimates and the summary reserve fit in 8 minutes, every step
has one, and the bench step's estimate holds bench/gpu_check.py's section shares (bench/gpucheck/config.py)."""
from __future__ import annotations

import re
from pathlib import Path

from gpucheck.config import STARTUP_S, make_config
from gpucheck.sections import SECTIONS

SCRIPT = Path(__file__).with_name("gpu_check.sh")
EIGHT_MINUTES = 480


def estimates() -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^EST_(\w+)=(\d+)", SCRIPT.read_text(), re.M)}


def test_every_step_has_an_estimate_and_all_fit_in_eight_minutes():
    text = SCRIPT.read_text()
    steps = re.search(r'^STEPS="([^"]+)"', text, re.M).group(1).split(",")
    est = estimates()
    assert set(est) == set(steps)
    reserve = int(re.search(r"^SUMMARY_S=(\d+)", text, re.M).group(1))
    assert sum(est.values()) + reserve <= EIGHT_MINUTES
    assert re.search(r'BUDGET_S="\$\{GPU_CHECK_BUDGET_S:-(\d+)\}"', text).group(1) == str(EIGHT_MINUTES)


def test_the_section_shares_fit_the_bench_estimate():
    budget = make_config(False)["budget"]
    assert set(budget) == set(SECTIONS)  # every section has a share (a missing one would get the default 30 s)
    assert sum(budget.values()) + STARTUP_S <= estimates()["bench"]


def test_each_step_limit_is_its_estimate():
    text = SCRIPT.read_text()
    for step, expr in (("build", '"$EST_build"'), ("tests", '"${GPU_CHECK_TESTS_S:-$EST_tests}"'),
                       ("bench", '"${GPU_CHECK_BENCH_S:-$EST_bench}"'), ("sanitizers", '"${SANITIZER_TIMEOUT_S:-${!est}}"')):
        assert f"left {expr}" in text, step
