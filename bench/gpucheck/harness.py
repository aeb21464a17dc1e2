"""The timing harness of the GPU check: one call timed, methods timed in interleaved rounds (median and min),
the extra peak memory of a call, and the memory and CUDA-context housekeeping between measurements.

Interleaving (A B C A B C ...) rather than timing each method in one block means a clock or thermal drift
during the run affects every method alike, so their ratios stay fair.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable

import torch

MiB = 1 << 20


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU), so that a wall-clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Collect garbage and return cached GPU memory; never raises (a broken CUDA context is found by
    :func:`cuda_healthy` after the section)."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001
            print(f"gpu_check: CUDA error while freeing memory: {type(exc).__name__}: {exc}", flush=True)


def cuda_healthy(device: torch.device) -> bool:
    """False once the CUDA context is broken (a sticky error such as an illegal memory access): every later
    CUDA call would fail, so the remaining sections need a fresh process."""
    if device.type != "cuda":
        return True
    try:
        t = torch.ones(4, device=device)
        ok = float((t + 1).sum().item()) == 8.0
        torch.cuda.synchronize(device)
        return ok
    except Exception as exc:  # noqa: BLE001
        print(f"gpu_check: the CUDA context is broken: {type(exc).__name__}: {exc}", flush=True)
        return False


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call (CUDA events around it on a GPU; wall clock after a sync on a CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench(methods: dict[str, Callable[[], Any]], device: torch.device, *, rounds: int | None = None,
          rep_ms: float = 20.0, min_rounds: int = 3, max_rounds: int = 50, warmup: int = 1) -> dict[str, dict]:
    """Interleaved timing: warm-up calls, then rounds of A B C ...; {name: {median_ms, min_ms, n}}.

    Without ``rounds``, as many rounds as make the slowest method run about ``rep_ms`` in total
    (clamped to [min_rounds, max_rounds]).
    """
    est: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name, fn in methods.items():
        try:
            for _ in range(max(0, warmup - 1)):
                fn()
            est[name] = time_once(fn, device)  # the last warm-up call, timed: sizes the rounds
        except Exception as exc:  # noqa: BLE001 - a failing method is dropped, the others are timed
            errors[name] = f"{type(exc).__name__}: {exc}"[:500]
            free(device)
    live = {n: f for n, f in methods.items() if n in est}
    if rounds is None:
        rounds = int(min(max_rounds, max(min_rounds, rep_ms / max(max(est.values(), default=1.0), 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(rounds):
        for name, fn in list(live.items()):
            try:
                times[name].append(time_once(fn, device))
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"{type(exc).__name__}: {exc}"[:500]
                del live[name]
                free(device)
    out: dict[str, dict] = {name: {"error": err} for name, err in errors.items()}
    for name, ts in times.items():
        if ts and name not in errors:
            out[name] = {"median_ms": statistics.median(ts), "min_ms": min(ts), "n": len(ts), "warmup_ms": est[name]}
    return out


def extra_peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak allocated memory during fn() minus allocated before it (MiB); None off CUDA."""
    if device.type != "cuda":
        fn()
        return None
    free(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MiB
