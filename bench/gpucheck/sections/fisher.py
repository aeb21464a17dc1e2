"""Section fisher: a BERT Fisher pass under bf16 autocast, fastsel (default and each linear backend) vs a
training step, a plain forward+backward, the per-example loop, torch.func vmap and Opacus: agreement checks
first (fp32 vs the loop, bf16 per-layer traces), then time and extra peak memory."""
from __future__ import annotations

import json
import time
import traceback
from typing import Any, Callable

import torch

from ..agreement import diag_err, trace_err
from ..backends import autocast, linear_backend_env, linear_variants
from ..harness import MiB, bench, extra_peak_mib, free
from ..run import Run


def section_fisher(run: Run, res: dict) -> None:
    import peers

    dev, cfg = run.device, run.cfg
    bc = peers.BenchConfig(**cfg["bert"])
    res["config"] = cfg["bert"]
    model = peers.make_model(bc, dev)
    batch = peers.make_batch(bc, dev)
    res["param_mib"] = peers.param_bytes(model) / MiB
    variants = [v for v in linear_variants(dev) if v != "reference"]
    checks: dict[str, Any] = {}
    res["checks"] = checks
    targets = run.data.setdefault("targets", {})

    def fastsel(backend: str | None = None, amp: bool = True):
        def call():
            with linear_backend_env(backend), autocast(dev, amp):
                return peers.fastsel_fisher(model, batch)
        return call

    # ---- agreement: fp32 fastsel vs the fp32 loop (the oracle); bf16 per-layer traces vs it
    try:
        loop32 = peers.loop(model, batch)
    except Exception as exc:  # noqa: BLE001 - no oracle: no agreement checks, the timings still run
        loop32 = None
        checks["loop_fp32"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    free(dev)
    try:
        if loop32 is not None:
            _fisher_checks(run, res, model, batch, loop32, fastsel, variants, checks)
    except Exception as exc:  # noqa: BLE001 - the timings still run
        checks["error"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
        print(checks["error"]["traceback"], flush=True)
    free(dev)
    try:
        _fisher_times(run, res, model, batch, fastsel, variants, checks, targets)
    except Exception as exc:  # noqa: BLE001 - the peers still run
        res["times_error"] = f"{type(exc).__name__}: {exc}"
        res["times_traceback"] = traceback.format_exc(limit=6)
        print(res["times_traceback"], flush=True)
    free(dev)
    _fisher_peers(run, res, model, batch, loop32, targets)
    bad_checks = [k for k, v in checks.items() if isinstance(v, dict) and v.get("ok") is False]
    if bad_checks or "times_error" in res:
        res["status"] = "failed (" + ", ".join(bad_checks + (["times"] if "times_error" in res else [])) + ")"
    del model, batch, loop32
    free(dev)


def _fisher_checks(run: Run, res: dict, model, batch, loop32, fastsel, variants, checks) -> None:
    import peers

    dev, cfg = run.device, run.cfg
    f32 = fastsel(amp=False)()
    bad = peers.disagreements(f32, loop32)
    checks["fastsel_fp32_vs_loop"] = {"ok": not bad, "disagreements": dict(list(bad.items())[:10]),
                                      "max_rel_err": diag_err(f32, loop32)}
    with autocast(dev):
        loop16 = peers.loop(model, batch)
    checks["loop_bf16_layer_err_vs_fp32"] = trace_err(loop16, loop32, model)
    for v in [None] + variants:
        name = f"fastsel[{v or 'default'}]"
        try:
            d = fastsel(v)()
            err = trace_err(d, loop32, model)
            checks[f"{name}_bf16_layer_err"] = {"max_rel_err": err, "tol": cfg["layer_tol"], "ok": err <= cfg["layer_tol"],
                                                "vs_bf16_loop": trace_err(d, loop16, model)}
        except Exception as exc:  # noqa: BLE001
            checks[f"{name}_bf16_layer_err"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print("checks:", json.dumps(checks, default=str)[:1500], flush=True)


def _fisher_times(run: Run, res: dict, model, batch, fastsel, variants, checks, targets) -> None:
    """fastsel (default and each linear backend) vs a training step and a plain forward+backward, interleaved."""
    import copy

    import peers

    dev, cfg = run.device, run.cfg

    train_model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-5)

    def train_step():
        with autocast(dev):
            logits = train_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain_fb():
        with autocast(dev):
            peers.plain(model, batch)

    methods = {"train_step": train_step, "plain_fwd_bwd": plain_fb, "fastsel": fastsel()}
    for v in variants:  # fisher_untimed (dry: triton, in its interpreter): checked above, not timed
        if checks.get(f"fastsel[{v}]_bf16_layer_err", {}).get("error") is None and v not in cfg["fisher_untimed"]:
            methods[f"fastsel[{v}]"] = fastsel(v)
    times = bench(methods, dev, rounds=cfg["fisher_rounds"], warmup=2)
    mem = {}
    for name, fn in methods.items():
        try:
            mem[name] = extra_peak_mib(fn, dev)
        except Exception as exc:  # noqa: BLE001
            mem[name] = f"{type(exc).__name__}: {exc}"
    res.setdefault("methods", {}).update({n: {**t, "extra_mib": mem.get(n)} for n, t in times.items()})
    del train_model, opt
    free(dev)
    print({n: round(t.get("median_ms", float("nan")), 2) for n, t in times.items()}, "extra MiB", mem, flush=True)
    if "median_ms" in times.get("fastsel", {}) and "median_ms" in times.get("train_step", {}):
        fs_ms = times["fastsel"]["median_ms"]
        ratio = fs_ms / times["train_step"]["median_ms"]
        res["fastsel_x_train_step"] = ratio
        if "median_ms" in times.get("plain_fwd_bwd", {}):
            res["fastsel_x_plain_fwd_bwd"] = fs_ms / times["plain_fwd_bwd"]["median_ms"]
        targets["fisher: fastsel / train step"] = {"value": ratio, "target": "<= 1.2", "met": ratio <= 1.2}
    # fastsel in fp32 too (the comparison for peers that only run in fp32)
    t32 = bench({"fastsel_fp32": fastsel(amp=False)}, dev, rounds=max(2, cfg["fisher_rounds"] // 2))["fastsel_fp32"]
    res["methods"]["fastsel_fp32"] = {**t32, "extra_mib": extra_peak_mib(fastsel(amp=False), dev) if "error" not in t32 else None}


def _fisher_peers(run: Run, res: dict, model, batch, loop32, targets) -> None:
    """The per-example loop, Opacus and vmap: bf16 autocast, fp32 where that fails; each checked first."""
    import peers

    dev, cfg = run.device, run.cfg
    bc = peers.BenchConfig(**cfg["bert"])
    res.setdefault("methods", {})
    peer_fns: dict[str, Callable] = {
        "loop": lambda: peers.loop(model, batch),
        "opacus": lambda: peers.opacus(model, batch),
    }
    B = bc.batch_size
    chunk = [B]
    peer_fns["vmap"] = lambda: peers.vmap(model, batch, chunk=chunk[0])
    order = ["loop", "opacus", "vmap"]
    for name in order:
        pr: dict[str, Any] = {}
        res["methods"][name] = pr
        if time.monotonic() > run.deadline or run.over(res):
            pr["status"] = "skipped (time budget)"
            continue
        for amp in (True, False):
            precision = "bf16 autocast" if amp else "fp32"
            try:
                def call(amp=amp):
                    with autocast(dev, amp):
                        return peer_fns[name]()
                while True:
                    try:
                        result = call()  # warm-up, and the agreement check
                        break
                    except torch.OutOfMemoryError:
                        if name != "vmap" or chunk[0] == 1:
                            raise
                        chunk[0] = max(1, chunk[0] // 2)
                        free(dev)
                if loop32 is None:
                    pr["check"] = {"ok": None, "note": "no fp32 loop to compare with"}
                elif amp:
                    err = trace_err(result, loop32, model)
                    pr["check"] = {"bf16_layer_err_vs_fp32_loop": err, "ok": err <= cfg["layer_tol"]}
                else:
                    bad = peers.disagreements(result, loop32)
                    pr["check"] = {"ok": not bad, "disagreements": dict(list(bad.items())[:5])}
                del result
                free(dev)
                t = bench({name: call}, dev, rounds=cfg["peer_reps"], warmup=0)[name]
                pr.update(t, precision=precision, extra_mib=extra_peak_mib(call, dev))
                if name == "vmap":
                    pr["chunk"] = chunk[0]
                free(dev)
                break
            except Exception as exc:  # noqa: BLE001
                pr[f"error_{'bf16' if amp else 'fp32'}"] = f"{type(exc).__name__}: {exc}"[:500]
                free(dev)
        base = res["methods"].get("fastsel" if pr.get("precision", "").startswith("bf16") else "fastsel_fp32", {})
        if "median_ms" in pr and "median_ms" in base:
            pr["x_fastsel"] = pr["median_ms"] / base["median_ms"]
            if isinstance(pr.get("extra_mib"), float) and isinstance(base.get("extra_mib"), float) and base["extra_mib"] > 0:
                pr["mem_x_fastsel"] = pr["extra_mib"] / base["extra_mib"]
            print(f"{name}: {pr['median_ms']:.1f} ms ({pr['precision']}), x{pr['x_fastsel']:.1f} fastsel, "
                  f"extra {pr.get('extra_mib')} MiB", flush=True)
        else:
            print(f"{name}: {pr}", flush=True)
    for name, want in (("loop", 20.0), ("vmap", 3.0), ("opacus", 3.0)):
        pr = res["methods"].get(name, {})
        if "x_fastsel" in pr:
            met = pr["x_fastsel"] >= want
            tgt = f">= {want:g}"
            if name != "loop":
                mx = pr.get("mem_x_fastsel")
                met = met and (mx is None or mx >= 10)
                tgt += " and >= 10x fastsel's extra memory"
            targets[f"fisher: {name} / fastsel"] = {"value": pr["x_fastsel"], "mem_x": pr.get("mem_x_fastsel"),
                                                    "target": tgt, "met": met, "precision": pr["precision"]}
