"""Fixtures of the fastsel benchmarks, and a summary table (time, ratio vs the floor, agreement) at the end."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import peers  # noqa: E402

# Filled by the benchmarks: {group: {method: {"median_s", "agrees", "bad", ...}}}
RECORDS: dict[str, dict[str, dict]] = {}


@pytest.fixture(scope="session")
def cpu_workload():
    """(config, model, batch, loop reference diagonal) of the CPU benchmark, built once."""
    cfg = peers.CPU_CONFIG
    model = peers.make_model(cfg, "cpu")
    batch = peers.make_batch(cfg, "cpu")
    return cfg, model, batch, peers.loop(model, batch)


@pytest.fixture(scope="session")
def gpu_workload():
    """(config, model, batch, loop reference diagonal) of the GPU benchmark (BERT-base size)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = peers.GPU_CONFIG
    model = peers.make_model(cfg, "cuda")
    batch = peers.make_batch(cfg, "cuda")
    return cfg, model, batch, peers.loop(model, batch)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for group, rows in RECORDS.items():
        floor = rows.get("plain", {}).get("median_s")
        terminalreporter.section(f"{group}: median time, ratio vs plain forward+backward, agreement with the loop")
        terminalreporter.write_line(f"{'method':<16}{'median s':>10}{'x plain':>9}  agrees  wrong parameters (max rel. error)")
        for name, r in rows.items():
            t = r.get("median_s")
            ratio = f"{t / floor:.2f}" if t is not None and floor else "-"
            agrees = {True: "y", False: "n", None: "-"}[r.get("agrees")]
            bad = ", ".join(f"{n} ({e:.2g})" for n, e in r.get("bad", {}).items())
            ts = f"{t:.3f}" if t is not None else "-"
            terminalreporter.write_line(f"{name:<16}{ts:>10}{ratio:>9}  {agrees:^6}  {bad}")
