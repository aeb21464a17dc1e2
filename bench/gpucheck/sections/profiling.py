"""Section profile: where the time of a Fisher step and of a variability batch goes (torch.profiler's top
events by device and by host time): the reasons behind a missed target."""
from __future__ import annotations

import time

import torch

from ..backends import autocast
from ..harness import free, sync
from ..run import Run
from .variability import variability_batches


def _top_events(prof, device_type: str, k: int = 15) -> dict[str, list[dict]]:
    """The k events with the most self device time (kernels) and the most self CPU time (host ops)."""
    rows = []
    for e in prof.key_averages():
        dev_self = getattr(e, "self_device_time_total", None)
        if dev_self is None:
            dev_self = getattr(e, "self_cuda_time_total", 0)
        rows.append({"name": e.key[:120], "count": e.count, "self_device_ms": dev_self / 1e3,
                     "self_cpu_ms": e.self_cpu_time_total / 1e3})
    by_dev = sorted(rows, key=lambda r: -r["self_device_ms"])[:k] if device_type == "cuda" else []
    by_cpu = sorted(rows, key=lambda r: -r["self_cpu_ms"])[:k]
    total_dev = sum(r["self_device_ms"] for r in rows)
    total_cpu = sum(r["self_cpu_ms"] for r in rows)
    return {"top_device": by_dev, "top_cpu": by_cpu, "total_self_device_ms": total_dev, "total_self_cpu_ms": total_cpu}


def section_profile(run: Run, res: dict) -> None:
    import peers
    from torch.profiler import ProfilerActivity, profile

    from fastsel.hf.io import model_inputs
    from fastsel.scores.variability import accumulate_class_statistics

    dev, cfg = run.device, run.cfg
    bc = peers.BenchConfig(**cfg["bert"])
    model = peers.make_model(bc, dev)
    batch = peers.make_batch(bc, dev)
    batches = variability_batches(2, bc.batch_size, bc.seq_len, bc.vocab_size, dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])

    def fisher_step():
        with autocast(dev):
            peers.fastsel_fisher(model, batch)

    def plain_step():
        with autocast(dev):
            peers.plain(model, batch)

    def variability_pass():
        with autocast(dev):
            accumulate_class_statistics(model, batches, num_classes=2, pooling="mean")

    def forward_pass():
        with torch.no_grad(), autocast(dev):
            for b in batches:
                model(**model_inputs(b))

    for name, fn in {"fisher_step": fisher_step, "plain_fwd_bwd": plain_step, "variability_2_batches": variability_pass,
                     "forward_2_batches": forward_pass}.items():
        try:
            fn()
            sync(dev)  # warm
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                fn()
                sync(dev)
            wall = (time.perf_counter() - t0) * 1e3
            res[name] = {"wall_ms_profiled": wall, **_top_events(prof, dev.type)}
            top = res[name]["top_device"] or res[name]["top_cpu"]
            print(f"profile {name}: wall {wall:.1f} ms (profiled), device {res[name]['total_self_device_ms']:.1f} ms; top:",
                  ", ".join(f"{r['name'][:40]} {r['self_device_ms'] or r['self_cpu_ms']:.2f}ms x{r['count']}" for r in top[:6]),
                  flush=True)
        except Exception as exc:  # noqa: BLE001
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
        free(dev)
    del model, batch, batches
    free(dev)
