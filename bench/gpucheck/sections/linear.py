"""Section linear: every backend of accumulate_linear_sq_grad (the CUDA kernels, triton, bmm) on BERT layer shapes
in bf16, fp16 and fp32, checked against the fp32 reference, then timed interleaved with the weight-gradient GEMM of
the same shape (the physical limit); one mixed-dtype call (g bf16, x fp32, as under autocast); the per-(dtype,
shape class) winners, with rules in the format of fastsel/ops/backend_table.json, and that table written from
them to OUT/backend_table.json (bench/make_backend_table.py's table_from: every class the run timed, T<=32
included, is a measured rule; a human copies it to fastsel/ops/ after reading the run)."""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

import torch

from ..agreement import close
from ..backends import linear_call, linear_variants
from ..config import DTYPES
from ..harness import bench, free, sync, time_once
from ..run import Run


def _linear_config(run: Run, res: dict, dname: str, shape_name: str, O: int, I: int, B: int, T: int,
                   variants: list[str], timed: list[str], too_slow: dict) -> dict:
    from fastsel import ops
    from fastsel.ops.backend import linear_shape_class

    dev, dtype = run.device, DTYPES[dname]
    rec: dict[str, Any] = {"dtype": dname, "shape": shape_name, "O": O, "I": I, "B": B, "T": T,
                           "class": "|".join(linear_shape_class(B, T, O, I)), "variants": {}}
    gen = torch.Generator(device=dev).manual_seed(B * 7919 + T * 31 + O + I)
    g = torch.randn(B, T, O, device=dev, generator=gen).to(dtype)
    x = torch.randn(B, T, I, device=dev, generator=gen).to(dtype)
    ref = torch.zeros(O, I, device=dev)
    ops.accumulate_linear_sq_grad_ref(ref, g.float(), x.float())
    rtol = 1e-3 if dtype != torch.float32 else 1e-4
    flops = 2 * B * T * O * I + 2 * O * I * B
    methods: dict[str, Callable] = {}
    for v in variants:
        vr: dict[str, Any] = {}
        rec["variants"][v] = vr
        try:
            out = torch.zeros(O, I, device=dev)
            call = linear_call(v)
            if v == "triton" and run.cuda:  # its first call per shape class autotunes (compiling each configuration): a
                t_tune = time.perf_counter()  # once-per-machine cost, not a call's (kept in Triton's cache)
                call(torch.zeros(O, I, device=dev), g, x)
                sync(dev)
                vr["first_call_with_tuning_ms"] = (time.perf_counter() - t_tune) * 1e3
            single = time_once(lambda: call(out, g, x), dev)  # also the first (cold) call
            ok, err = close(out, ref, rtol)
            vr.update(check_ok=ok, max_rel_err=err, rtol=rtol, first_call_ms=single)
            if v not in timed:
                vr["timed"] = "no (check only)"
                continue
            if flops >= too_slow.get((v, dname), math.inf) or single > run.cfg["slow_s"] * 1e3:
                # configs of this dtype with at least this much work are skipped for this variant too
                too_slow[(v, dname)] = min(flops, too_slow.get((v, dname), math.inf))
                vr["timed"] = f"skipped: too slow ({single:.1f} ms for one call)"
                continue
            acc = torch.zeros(O, I, device=dev)
            methods[v] = (lambda call=call, acc=acc: call(acc, g, x))
        except Exception as exc:  # noqa: BLE001
            vr["error"] = f"{type(exc).__name__}: {exc}"
            vr["check_ok"] = False
    g2, x2 = g.reshape(-1, O), x.reshape(-1, I)
    methods["wgrad_gemm"] = lambda: torch.mm(g2.t(), x2)
    times = bench(methods, dev, rep_ms=run.cfg["linear_rep_ms"], max_rounds=run.cfg["linear_max_rounds"],
                  min_rounds=2 if run.dry else 3)
    ceiling = run.data.get("ceilings", {}).get(dname)
    gemm = times.pop("wgrad_gemm")
    gemm_ms = gemm.get("median_ms")
    rec["wgrad_gemm"] = {**gemm, "tflops": 2 * B * T * O * I / (gemm_ms * 1e-3) / 1e12 if gemm_ms else None}
    for v, t in times.items():
        if "median_ms" not in t:
            rec["variants"][v].update(t, check_ok=False)
            continue
        tflops = flops / (t["median_ms"] * 1e-3) / 1e12
        rec["variants"][v].update(t, tflops=tflops, x_wgrad_gemm=t["median_ms"] / gemm_ms if gemm_ms else None,
                                  frac_of_gemm_peak=(tflops / ceiling) if ceiling else None)
    del g, x, ref, methods
    return rec


def linear_winners(configs: list[dict], capability: str | None, gpu: str | None) -> tuple[dict, list[dict]]:
    """Per (dtype, shape class): the backend with the lowest geometric-mean slowdown vs the best backend of
    each config (over the configs where every candidate was timed and passed its check)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in configs:
        groups.setdefault((c["dtype"], c["class"]), []).append(c)
    winners: dict[str, dict] = {}
    rules: list[dict] = []
    for (dname, cls), cs in sorted(groups.items()):
        cands = sorted({v for c in cs for v, r in c["variants"].items() if "median_ms" in r and r.get("check_ok")})
        usable = [c for c in cs if all("median_ms" in c["variants"].get(v, {}) for v in cands)]
        if not cands or not usable:
            continue
        slow: dict[str, list[float]] = {v: [] for v in cands}
        for c in usable:
            best = min(c["variants"][v]["median_ms"] for v in cands)
            for v in cands:
                slow[v].append(c["variants"][v]["median_ms"] / best)
        geo = {v: math.exp(sum(map(math.log, s)) / len(s)) for v, s in slow.items()}
        win = min(geo, key=geo.get)
        failed = sorted({v for c in cs for v, r in c["variants"].items() if r.get("check_ok") is False})
        winners.setdefault(dname, {})[cls] = {"backend": win, "geomean_slowdown": geo, "configs": len(usable),
                                              "failed_checks": failed}
        T, Bc, OI = cls.split("|")
        others = sorted((geo[v], v) for v in geo if v != win)
        why = f"measured on {gpu or 'this GPU'}: {len(usable)} configs" + (
            f", next best {others[0][1]} x{others[0][0]:.2f}" if others else "")
        rules.append({"when": {"capability": capability, "dtype": [dname], "T": T, "B": Bc, "OI": OI},
                      "backend": win, "why": why})
    return winners, rules


def write_backend_table(run: Run) -> dict[str, Any]:
    """OUT/backend_table.json from this run's rules (bench/make_backend_table.py's table_from); what it covers."""
    from make_backend_table import table_from

    path = run.out_dir / "backend_table.json"
    try:
        table = table_from(run.data, f"{run.path.name} of {run.data.get('started')}")
    except SystemExit as exc:  # no rules (nothing timed)
        return {"error": str(exc)}
    path.write_text(json.dumps(table, indent=1) + "\n")
    classes = sorted({(r["when"].get("T"), d) for r in table["rules"] for d in r["when"].get("dtype", [])})
    return {"path": str(path), "rules": len(table["rules"]), "T_classes": sorted({t for t, _ in classes}),
            "dtypes": sorted({d for _, d in classes})}


def section_linear(run: Run, res: dict) -> None:
    dev, cfg = run.device, run.cfg
    variants = linear_variants(dev)
    # "kernel" is the C++ auto choice (one of the explicit variants on CUDA): checked, timed only on CPU
    timed = [v for v in variants if not (v == "kernel" and run.cuda)]
    res["variants"], res["timed"] = variants, timed
    configs: list[dict] = []
    res["configs"] = configs
    skipped: list[str] = []
    too_slow: dict[tuple[str, str], float] = {}  # (variant, dtype) -> FLOPs of the first too-slow config
    for dname in cfg["linear_dtypes"]:
        for shape_name, shapes in cfg["linear_shapes"].items():
            for O, I in shapes:
                for B in cfg["linear_B"]:
                    for T in cfg["linear_T"]:
                        label = f"{dname} {shape_name} O{O} I{I} B{B} T{T}"
                        if run.over(res):
                            skipped.append(label)
                            continue
                        try:
                            rec = _linear_config(run, res, dname, shape_name, O, I, B, T, variants, timed, too_slow)
                        except Exception as exc:  # noqa: BLE001
                            rec = {"dtype": dname, "shape": shape_name, "O": O, "I": I, "B": B, "T": T,
                                   "error": f"{type(exc).__name__}: {exc}", "variants": {}, "class": "?"}
                        configs.append(rec)
                        line = "  ".join(
                            f"{v} {r['median_ms']:.3f}ms{'' if r.get('check_ok') else '(BAD)'}" if "median_ms" in r
                            else f"{v} {r.get('timed') or r.get('error', '?')}{'' if r.get('check_ok', True) else '(BAD)'}"
                            for v, r in rec["variants"].items())
                        gemm = rec.get("wgrad_gemm", {}).get("median_ms")
                        print(f"{label:<40} {line}  gemm {gemm if gemm is None else round(gemm, 3)}ms"
                              + (f"  ERROR {rec['error']}" if "error" in rec else ""), flush=True)
                        free(dev)
        run.save()
    if skipped:
        res["skipped_time_budget"] = skipped
    res["checks_failed"] = [f"{c['dtype']} O{c['O']} I{c['I']} B{c['B']} T{c['T']} {v}"
                            for c in configs for v, r in c["variants"].items() if r.get("check_ok") is False]
    # mixed dtypes, as under autocast: g bf16, x fp32
    B, T, O, I = cfg["mixed_shape"]
    mixed: dict[str, Any] = {"B": B, "T": T, "O": O, "I": I, "variants": {}}
    res["mixed_dtype"] = mixed
    try:
        from fastsel import ops

        g = torch.randn(B, T, O, device=dev).to(torch.bfloat16)
        x = torch.randn(B, T, I, device=dev)
        ref_half = torch.zeros(O, I, device=dev)
        ops.accumulate_linear_sq_grad_ref(ref_half, g.float(), x.to(torch.bfloat16).float())
        ref_full = torch.zeros(O, I, device=dev)
        ops.accumulate_linear_sq_grad_ref(ref_full, g.float(), x)
        methods = {}
        for v in variants:
            vr: dict[str, Any] = {}
            mixed["variants"][v] = vr
            try:
                out = torch.zeros(O, I, device=dev)
                linear_call(v)(out, g, x)
                ok_half, err_half = close(out, ref_half, 1e-3)
                ok_full, err_full = close(out, ref_full, 2e-2, 2e-2)
                vr.update(check_ok=ok_half or ok_full, max_rel_err_vs_bf16_x=err_half, max_rel_err_vs_fp32_x=err_full)
                acc = torch.zeros(O, I, device=dev)
                methods[v] = (lambda v=v, acc=acc: linear_call(v)(acc, g, x))
            except Exception as exc:  # noqa: BLE001
                vr["error"] = f"{type(exc).__name__}: {exc}"
        for v, t in bench(methods, dev, rep_ms=cfg["linear_rep_ms"], max_rounds=cfg["linear_max_rounds"],
                          min_rounds=2 if run.dry else 3).items():
            mixed["variants"][v].update(t)
        print("mixed g bf16 / x fp32:", {v: round(r.get("median_ms", float("nan")), 3) for v, r in mixed["variants"].items()})
    except Exception as exc:  # noqa: BLE001
        mixed["error"] = f"{type(exc).__name__}: {exc}"
    winners, rules = linear_winners(configs, run.data.get("capability"), run.data.get("gpu"))
    run.data["linear_winners"] = {"winners": winners, "rules": rules}
    res["winners"] = {d: {c: w["backend"] for c, w in per.items()} for d, per in winners.items()}
    tuning = [r["first_call_with_tuning_ms"] for c in configs for r in c["variants"].values() if "first_call_with_tuning_ms" in r]
    if tuning:
        res["triton_first_calls_s"] = sum(tuning) / 1e3
    res["backend_table"] = write_backend_table(run)
    if res["checks_failed"]:
        res["status"] = "failed (agreement)"
