"""Exact Fisher diagonal: fastsel vs the plain forward+backward (the floor), the per-example loop,
torch.func vmap and Opacus. Every method's diagonal is checked against the loop's before it is timed.

CPU: random BERT (4 layers, hidden 256, intermediate 1024, vocab 30522), B=32, T=64, group "fisher-cpu".
GPU (when CUDA is available): BERT-base size, B=32, T=128, group "fisher-gpu"; also a plain training step
(forward + backward + AdamW step) as the floor of the target.

    PYTHONPATH=$PWD python -m pytest bench/test_fisher_bench.py -k cpu --benchmark-timer=time.process_time
    PYTHONPATH=$PWD python -m pytest bench/test_fisher_bench.py -k gpu

Peak memory: ``bench/fisher_memory.py`` (one fresh process per method).
"""
from __future__ import annotations

import copy

import pytest
import torch

import peers
from conftest import RECORDS

# Rounds per method: the peers take several seconds per call on a 2-core CPU.
CPU_ROUNDS = {"plain": 5, "fastsel": 5, "loop": 3, "vmap": 3, "opacus": 3}
GPU_ROUNDS = {"plain": 10, "train-step": 10, "fastsel": 10, "loop": 5, "vmap": 5, "opacus": 5}


def _record(group: str, name: str, benchmark, diagonal, reference, **extra) -> dict:
    """Check ``diagonal`` against the loop, store the verdict in the benchmark JSON and the summary."""
    row = RECORDS.setdefault(group, {}).setdefault(name, {})
    if diagonal is not None:
        bad = peers.disagreements(diagonal, reference)
        row.update(agrees=not bad, bad=bad)
        benchmark.extra_info["agrees_with_loop"] = not bad
        benchmark.extra_info["wrong_params"] = {n: e for n, e in bad.items()}
    else:
        row.update(agrees=None, bad={})
    row.update(extra)
    benchmark.extra_info.update(extra)
    return row


def _finish(row: dict, benchmark) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        row["median_s"] = stats.stats.median


@pytest.mark.benchmark(group="fisher-cpu")
@pytest.mark.parametrize("name", list(CPU_ROUNDS))
def test_fisher_cpu(benchmark, cpu_workload, name):
    cfg, model, batch, reference = cpu_workload
    method = peers.METHODS[name]
    benchmark.extra_info.update(method=method.doc, threads=torch.get_num_threads(), config=repr(cfg))
    diagonal = method.run(model, batch)  # the agreement check; also the warm-up
    row = _record("fisher-cpu", name, benchmark, diagonal, reference)
    assert diagonal is None or row["agrees"], f"{name} disagrees with the per-example loop: {row['bad']}"
    benchmark.pedantic(method.run, args=(model, batch), rounds=CPU_ROUNDS[name], iterations=1)
    _finish(row, benchmark)


def test_fisher_cpu_opacus_hf_ids(cpu_workload):
    """Opacus on HF's default (1, T) position ids: the position-embedding Fisher comes out wrong (summed
    over the batch before squaring), everything else right. Not timed (same cost as ``opacus``)."""
    cfg, model, batch, reference = cpu_workload
    bad = peers.disagreements(peers.opacus_hf_ids(model, batch), reference)
    RECORDS.setdefault("fisher-cpu", {})["opacus-hf-ids"] = {"agrees": not bad, "bad": bad}
    assert set(bad) == {"bert.embeddings.position_embeddings.weight"}, bad


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------


def _synced(fn):
    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


def _train_step(model, batch) -> None:
    """forward + backward + AdamW step of a copy of the model (the copy keeps the shared model unchanged)."""
    model.zero_grad(set_to_none=True)
    peers.log_likelihoods(model, batch).sum().neg().backward()
    model._bench_optimizer.step()  # type: ignore[attr-defined]
    model.zero_grad(set_to_none=True)


@pytest.mark.cuda
@pytest.mark.benchmark(group="fisher-gpu")
@pytest.mark.parametrize("name", list(GPU_ROUNDS))
def test_fisher_gpu(benchmark, gpu_workload, name):
    cfg, model, batch, reference = gpu_workload
    if name == "train-step":
        model = copy.deepcopy(model)
        model._bench_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        run = _synced(_train_step)
        doc = "forward + backward + AdamW step"
    else:
        run = _synced(peers.METHODS[name].run)
        doc = peers.METHODS[name].doc
    benchmark.extra_info.update(method=doc, device=torch.cuda.get_device_name(), config=repr(cfg))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    diagonal = run(model, batch)  # agreement check, warm-up and peak-memory measurement
    extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    row = _record("fisher-gpu", name, benchmark, diagonal, reference, extra_peak_mb=round(extra_mb, 1))
    assert diagonal is None or row["agrees"], f"{name} disagrees with the per-example loop: {row['bad']}"
    del diagonal
    benchmark.pedantic(run, args=(model, batch), rounds=GPU_ROUNDS[name], iterations=1, warmup_rounds=1)
    _finish(row, benchmark)
