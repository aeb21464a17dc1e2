"""All GPU timings of the project in one process: writes OUT/gpu_check.json and prints a short table.

    python3 bench/gpu_check.py --out runs/gpu_check            # on a GPU (BERT-base / BERT-large shapes)
    python3 bench/gpu_check.py --dry --out runs/gpu_check      # on a CPU: tiny shapes, CUDA-only parts skipped

Sections (each in its own try/except; the JSON is rewritten after every section, so a crash or a kill
leaves the results so far; an error is recorded and the next section runs):

  env          device, driver, torch / CUDA / transformers versions, what fastsel loaded
  gemm         measured bf16 and fp32 GEMM TFLOP/s (8192^3, random data) and device-to-device copy GB/s
  linear       every backend of accumulate_linear_sq_grad on BERT-base / BERT-large layer shapes, B in
               {8, 32, 128}, T in {128, 512}, bf16 and fp32: checked against the fp32 reference, then timed
               (interleaved with the weight-gradient GEMM of the same shape, the physical limit); one
               mixed-dtype call (g bf16, x fp32, as under autocast); per-(dtype, shape class) winners
               ("linear_winners", with rules in the format of fastsel/ops/backend_table.json)
  error        bf16 inputs: relative error of every backend vs an fp64 oracle, and of a bf16 pure-torch
               per-example bmm, on BERT-base shapes (B=32, T=128)
  fisher       BERT-base Fisher pass (B=32, T=128) under bf16 autocast: fastsel (default and each linear
               backend) vs a plain training step, the per-example loop, torch.func vmap and Opacus; time
               and extra peak memory, agreement checks first (fp32 vs the loop, bf16 per-layer traces)
  variability  tokens/s of accumulate_class_statistics vs a plain forward; class_stats_update vs its ref

Timing: warm-up, then methods interleaved round by round (A B C A B C ...), each call timed by CUDA
events (CPU: perf_counter); median and min reported. Extra memory = peak allocated during the method
minus allocated before it (CUDA only). ``--budget-s`` bounds the whole run: a section past its share
records what it skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

MiB = 1 << 20
LINEAR_ENV = "accumulate_linear_sq_grad"


# --------------------------------------------------------------------------------------------------
# Configuration: full (GPU) and dry (CPU, tiny)
# --------------------------------------------------------------------------------------------------


def make_config(dry: bool) -> dict[str, Any]:
    if dry:
        return {
            "gemm_n": 256, "copy_bytes": 16 * MiB,
            "linear_shapes": {"tiny": [(64, 48), (48, 72)]}, "linear_B": [2, 4], "linear_T": [8, 16],
            "linear_dtypes": ["bf16", "fp32"], "linear_rep_ms": 5.0, "linear_max_rounds": 2, "slow_s": 5.0,
            "mixed_shape": (2, 16, 64, 48),
            "error_shapes": [(64, 48), (48, 72)], "error_BT": (4, 16),
            "bert": dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vocab_size=1000,
                         batch_size=4, seq_len=16),
            "fisher_rounds": 2, "peer_reps": 1, "layer_tol": 0.05,
            "var_batches": 2, "var_rounds": 2, "var_layer": 1,
            "budget": {"gemm": 10, "linear": 30, "error": 10, "fisher": 60, "variability": 20, "profile": 20},
        }
    return {
        "gemm_n": 8192, "copy_bytes": 1 << 30,
        "linear_shapes": {"bert-base": [(768, 768), (3072, 768), (768, 3072)],
                          "bert-large": [(1024, 1024), (4096, 1024), (1024, 4096)]},
        "linear_B": [8, 32, 128], "linear_T": [128, 512], "linear_dtypes": ["bf16", "fp32"],
        "linear_rep_ms": 20.0, "linear_max_rounds": 50, "slow_s": 0.5,
        "mixed_shape": (32, 128, 3072, 768),
        "error_shapes": [(768, 768), (3072, 768), (768, 3072)], "error_BT": (32, 128),
        "bert": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, vocab_size=30522,
                     batch_size=32, seq_len=128),
        "fisher_rounds": 10, "peer_reps": 2, "layer_tol": 0.05,
        "var_batches": 8, "var_rounds": 5, "var_layer": 6,
        "budget": {"gemm": 15, "linear": 80, "error": 15, "fisher": 90, "variability": 30, "profile": 20},
    }


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
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


# --------------------------------------------------------------------------------------------------
# The run: sections, JSON, summary
# --------------------------------------------------------------------------------------------------


class Run:
    def __init__(self, out_dir: Path, dry: bool, device: torch.device, budget_s: float, resume: bool = False) -> None:
        self.out_dir, self.dry, self.device = out_dir, dry, device
        self.cfg = make_config(dry)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.data: dict[str, Any] = {"dry": dry, "device": str(device), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "budget_s": budget_s, "sections": {}}
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "gpu_check.json"
        if resume and self.path.is_file():  # a fresh process after a broken CUDA context: keep what was measured
            try:
                old = json.loads(self.path.read_text())
                self.data = {**old, "sections": old.get("sections", {}), "resumed": old.get("resumed", 0) + 1}
            except ValueError:
                pass

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def section(self, name: str, fn: Callable[["Run", dict], None]) -> None:
        """Run one section; its dict is saved whatever happens (status ok / failed / skipped)."""
        res: dict[str, Any] = {"status": "running"}
        self.data["sections"][name] = res
        share = self.cfg["budget"].get(name, 30)
        res["deadline"] = min(self.deadline, time.monotonic() + share)
        t0 = time.monotonic()
        print(f"\n=== {name} ===", flush=True)
        try:
            if time.monotonic() > self.deadline:
                res["status"] = "skipped (time budget)"
            else:
                fn(self, res)
                if res["status"] == "running":
                    res["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded, the next section runs
            res["status"] = "failed"
            res["error"] = f"{type(exc).__name__}: {exc}"
            res["traceback"] = traceback.format_exc(limit=8)
            print(res["traceback"], flush=True)
        finally:
            res.pop("deadline", None)
            res["seconds"] = round(time.monotonic() - t0, 2)
            free(self.device)
            # GPU_CHECK_FAKE_BROKEN=<section>: pretend that section broke the context (tests the restart on a CPU)
            if not cuda_healthy(self.device) or os.environ.get("GPU_CHECK_FAKE_BROKEN") == name:
                res["cuda_context_broken"] = True
                if not str(res["status"]).startswith("failed"):
                    res["status"] = "failed (CUDA context broken)"
            self.save()
            print(f"--- {name}: {res['status']} ({res['seconds']} s)", flush=True)

    def over(self, res: dict) -> bool:
        return time.monotonic() > res.get("deadline", self.deadline)


def check_record(name: str, err: float, tol: float, **extra: Any) -> dict:
    return {"name": name, "max_rel_err": err, "tol": tol, "ok": bool(err <= tol), **extra}


def rel_to_max(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (inf when got has non-finite values)."""
    got, ref = got.double(), ref.double()
    if not bool(torch.isfinite(got).all()):
        return math.inf
    return float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-300)


def close(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol_rel: float = 1e-5) -> tuple[bool, float]:
    """(|got - ref| <= rtol |ref| + atol_rel max|ref| everywhere, max |got - ref| / max |ref|)."""
    got, ref = got.double(), ref.double()
    if not bool(torch.isfinite(got).all()):
        return False, math.inf
    scale = float(ref.abs().max())
    ok = bool(((got - ref).abs() <= rtol * ref.abs() + atol_rel * scale).all())
    return ok, float((got - ref).abs().max()) / max(scale, 1e-300)


# --------------------------------------------------------------------------------------------------
# env
# --------------------------------------------------------------------------------------------------


def _cmd(args: list[str]) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def section_env(run: Run, res: dict) -> None:
    res["python"] = platform.python_version()
    res["torch"] = torch.__version__
    res["torch_cuda"] = torch.version.cuda
    res["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    res["cpu_threads"] = torch.get_num_threads()
    for mod in ("transformers", "triton", "opacus", "datasets", "peft"):
        try:
            res[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            res[mod] = f"not importable: {type(exc).__name__}: {exc}"
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        res["gpu"] = props.name
        res["capability"] = f"{props.major}.{props.minor}"
        res["sm_count"] = props.multi_processor_count
        res["gpu_memory_gib"] = round(props.total_memory / (1 << 30), 1)
        res["nvidia_smi"] = _cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"])
        run.data["gpu"] = props.name
        run.data["capability"] = res["capability"]
    else:
        res["gpu"] = None
        res["cpu"] = platform.processor() or platform.machine()
        run.data["skipped_no_gpu"] = ["CUDA-only linear backends (wmma, pipelined)", "peak GPU memory (extra_mib = null)",
                                      "GPU timings (CPU timings of tiny shapes only exercise the code)"]
    from fastsel.ops import backend as _backend
    from fastsel.ops import OPS

    ext = _backend.EXTENSION
    res["extension"] = {"loaded": ext.loaded, "cuda_kernels": ext.cuda, "reason": ext.reason,
                        **{k: getattr(ext, k, None) for k in ("built_with_torch", "built_with_cuda", "cuda_archs")}}
    res["ops"] = {op: list(_backend.op_backend(op, run.device)) for op in OPS}
    try:
        res["linear_backends"] = list(_backend.linear_backends_available(run.device))
    except Exception as exc:  # noqa: BLE001
        res["linear_backends"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps({k: res[k] for k in ("torch", "torch_cuda", "gpu", "extension", "linear_backends")}, default=str))


# --------------------------------------------------------------------------------------------------
# gemm: measured ceilings
# --------------------------------------------------------------------------------------------------


def section_gemm(run: Run, res: dict) -> None:
    n, dev = run.cfg["gemm_n"], run.device
    res["n"] = n
    res["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    for name in ("bf16", "fp32"):
        dtype = DTYPES[name]
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        t = bench({name: lambda: torch.mm(a, b)}, dev, rep_ms=300 if run.cuda else 50, min_rounds=3, max_rounds=50,
                  warmup=2)[name]
        if "error" in t:
            raise RuntimeError(f"{name} GEMM: {t['error']}")
        res[f"{name}_tflops"] = 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12
        res[f"{name}_tflops_best"] = 2 * n**3 / (t["min_ms"] * 1e-3) / 1e12
        res[f"{name}_ms"] = t
        del a, b
        free(dev)
    nbytes = run.cfg["copy_bytes"]
    src = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = bench({"copy": lambda: dst.copy_(src)}, dev, rep_ms=100, min_rounds=5)["copy"]
    if "error" in t:
        raise RuntimeError(f"copy: {t['error']}")
    res["copy_gbps"] = 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9  # bytes read + written
    res["copy_bytes"] = nbytes
    run.data["ceilings"] = {"bf16": res["bf16_tflops"], "fp32": res["fp32_tflops"]}
    print(f"bf16 {res['bf16_tflops']:.1f} TFLOP/s, fp32 {res['fp32_tflops']:.1f} TFLOP/s, copy {res['copy_gbps']:.0f} GB/s")


# --------------------------------------------------------------------------------------------------
# linear: every backend of the linear op
# --------------------------------------------------------------------------------------------------


def linear_call(name: str) -> Callable:
    from fastsel import ops

    def call(out, g, x):
        ops.accumulate_linear_sq_grad(out, g, x, backend=name)

    return call


def linear_variants(device: torch.device) -> list[str]:
    from fastsel.ops.backend import linear_backends_available

    return [b for b in linear_backends_available(device) if b != "reference"]


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
            if v == "triton":  # its first call per shape class autotunes (compiling each configuration): a
                call(torch.zeros(O, I, device=dev), g, x)  # once-per-machine cost, not a call's (kept in Triton's cache)
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
    if res["checks_failed"]:
        res["status"] = "failed (agreement)"


# --------------------------------------------------------------------------------------------------
# error: bf16 inputs vs an fp64 oracle
# --------------------------------------------------------------------------------------------------


def section_error(run: Run, res: dict) -> None:
    from fastsel import ops
    from fastsel.ops.backend import linear_backends_available

    dev = run.device
    B, T = run.cfg["error_BT"]
    backends = list(linear_backends_available(dev))
    res["B"], res["T"], res["shapes"] = B, T, []
    worst = 0.0
    for O, I in run.cfg["error_shapes"]:
        gen = torch.Generator(device=dev).manual_seed(O * 3 + I)
        g = torch.randn(B, T, O, device=dev, generator=gen).to(torch.bfloat16)
        x = torch.randn(B, T, I, device=dev, generator=gen).to(torch.bfloat16)
        oracle = torch.zeros(O, I, device=dev, dtype=torch.float64)
        chunk = max(1, (1 << 26) // (O * I))
        for s in range(0, B, chunk):
            oracle += torch.bmm(g[s:s + chunk].double().transpose(1, 2), x[s:s + chunk].double()).square().sum(0)
        norm = float(oracle.norm())
        rec: dict[str, Any] = {"O": O, "I": I, "errors": {}}
        # the bf16 pure-torch reference: per-example bmm with bf16 output, squared and summed in fp32
        naive = torch.zeros(O, I, device=dev)
        for s in range(0, B, chunk):
            naive += torch.bmm(g[s:s + chunk].transpose(1, 2), x[s:s + chunk]).float().square().sum(0)
        rec["bf16_torch_err"] = float((naive.double() - oracle).norm()) / norm
        for bname in backends:
            try:
                out = torch.zeros(O, I, device=dev)
                if bname == "reference":
                    ops.accumulate_linear_sq_grad_ref(out, g, x)
                else:
                    ops.accumulate_linear_sq_grad(out, g, x, backend=bname)
                err = float((out.double() - oracle).norm()) / norm
                rec["errors"][bname] = {"rel_err": err, "x_bf16_torch": err / max(rec["bf16_torch_err"], 1e-300)}
                if bname != "reference":
                    worst = max(worst, err / max(rec["bf16_torch_err"], 1e-300))
            except Exception as exc:  # noqa: BLE001
                rec["errors"][bname] = {"error": f"{type(exc).__name__}: {exc}"}
        res["shapes"].append(rec)
        print(f"O{O} I{I}: bf16-torch {rec['bf16_torch_err']:.2e}  "
              + "  ".join(f"{k} {v.get('rel_err', float('nan')):.2e}" for k, v in rec["errors"].items()), flush=True)
        del g, x, oracle, naive
        free(dev)
    res["worst_x_bf16_torch"] = worst
    run.data.setdefault("targets", {})["bf16 error <= 2x bf16-torch"] = {"value": worst, "target": "<= 2", "met": worst <= 2}


# --------------------------------------------------------------------------------------------------
# fisher: BERT-base Fisher pass vs its peers
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def linear_backend_env(name: str | None):
    """FASTSEL_BACKEND=accumulate_linear_sq_grad=<name> for the duration (None: leave the default)."""
    old = os.environ.get("FASTSEL_BACKEND")
    if name is not None:
        os.environ["FASTSEL_BACKEND"] = f"{LINEAR_ENV}={name}"
    try:
        yield
    finally:
        if name is not None:
            if old is None:
                os.environ.pop("FASTSEL_BACKEND", None)
            else:
                os.environ["FASTSEL_BACKEND"] = old


def autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def diag_err(got: dict, ref: dict, zero_rel: float = 1e-14) -> float:
    """max over tensors of max |got - ref| / max |ref| (floored at zero_rel x the largest value of all, as
    peers.disagreements: BERT's attention key bias has an exactly-zero gradient, rounding noise each way)."""
    floor = zero_rel * max(float(r.abs().max()) for r in ref.values() if r.numel())
    err = 0.0
    for n, r in ref.items():
        if n not in got:
            return math.inf
        d = float((got[n].double().cpu() - r.double().cpu()).abs().max()) if r.numel() else 0.0
        err = max(err, d / max(float(r.abs().max()), floor, 1e-300))
    return err


def layer_traces(diag: dict, model) -> list[float]:
    from fastsel.scores.fisher import layer_statistics

    layers, extra = layer_statistics(diag, model)
    return [l["trace"] for l in layers] + [extra[k]["trace"] for k in sorted(extra)]


def trace_err(a: dict, b: dict, model) -> float:
    ta, tb = layer_traces(a, model), layer_traces(b, model)
    return max(abs(x - y) / max(abs(y), 1e-300) for x, y in zip(ta, tb))


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
    for v in variants:
        if checks.get(f"fastsel[{v}]_bf16_layer_err", {}).get("error") is None:
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


# --------------------------------------------------------------------------------------------------
# variability: streaming class statistics vs a plain forward
# --------------------------------------------------------------------------------------------------


def variability_batches(n: int, B: int, T: int, vocab: int, device: torch.device, seed: int = 0) -> list[dict]:
    """Padded batches with special tokens (CLS first, SEP last) and labels, as fastsel.data makes them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (B, T), generator=g)
        lengths = torch.randint(max(4, T // 4), T + 1, (B,), generator=g)
        att = (torch.arange(T) < lengths.unsqueeze(1)).long()
        special = 1 - att
        special[:, 0] = 1
        special[torch.arange(B), lengths - 1] = 1
        out.append({k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": att, "special_tokens_mask": special,
                                                  "labels": torch.randint(0, 2, (B,), generator=g)}.items()})
    return out


def _variability_check(run: Run, res: dict, model, batches: list[dict], bc) -> None:
    """class_stats_update vs its reference on one layer's hidden states (autocast), float64 accumulators,
    two merges."""
    from fastsel import ops
    from fastsel.capture.taps import pool_mask
    from fastsel.hf.io import model_inputs

    dev, layer = run.device, run.cfg["var_layer"]
    D = bc.hidden_size
    state = {name: [torch.zeros(2, dtype=torch.float64, device=dev), torch.zeros(2, D, dtype=torch.float64, device=dev),
                    torch.zeros(2, D, D, dtype=torch.float64, device=dev)] for name in ("op", "ref")}
    dtype = None
    for b in batches[:2]:
        with torch.no_grad(), autocast(dev):
            hidden = model(**model_inputs(b), output_hidden_states=True).hidden_states[layer]
        dtype = str(hidden.dtype)
        mask = pool_mask(b, "mean")
        ops.class_stats_update(*state["op"], hidden, mask, b["labels"])
        ops.class_stats_update_ref(*state["ref"], hidden, mask, b["labels"])
    errs = [rel_to_max(a, r) for a, r in zip(state["op"], state["ref"])]
    res["check"] = check_record(f"class_stats_update vs ref (layer {layer}, hidden {dtype})", max(errs), 1e-8,
                                per_tensor=errs)
    print(res["check"], flush=True)


def section_variability(run: Run, res: dict) -> None:
    import peers
    from fastsel.hf.io import model_inputs
    from fastsel.scores.variability import accumulate_class_statistics

    dev, cfg = run.device, run.cfg
    bc = peers.BenchConfig(**cfg["bert"])
    model = peers.make_model(bc, dev)
    batches = variability_batches(cfg["var_batches"], bc.batch_size, bc.seq_len, bc.vocab_size, dev)
    padded = sum(b["input_ids"].numel() for b in batches)
    real = int(sum(int(b["attention_mask"].sum()) for b in batches))
    res.update(batches=len(batches), B=bc.batch_size, T=bc.seq_len, padded_tokens=padded, real_tokens=real)
    try:
        _variability_check(run, res, model, batches, bc)
    except Exception as exc:  # noqa: BLE001 - the timing still runs
        res["check"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
        print(res["check"]["traceback"], flush=True)
    free(dev)

    def plain():
        with torch.no_grad(), autocast(dev):
            for b in batches:
                model(**model_inputs(b), output_hidden_states=False)

    def streaming():
        with autocast(dev):
            accumulate_class_statistics(model, batches, num_classes=2, pooling="mean")

    times = bench({"plain_forward": plain, "variability": streaming}, dev, rounds=cfg["var_rounds"], warmup=2)
    res["methods"] = times
    for name, t in times.items():
        if "median_ms" in t:
            t["tokens_per_s"] = padded / (t["median_ms"] * 1e-3)
            t["real_tokens_per_s"] = real / (t["median_ms"] * 1e-3)
            t["extra_mib"] = extra_peak_mib(plain if name == "plain_forward" else streaming, dev)
    print(json.dumps(times, default=str), flush=True)
    problems = [f"{n}: {t['error']}" for n, t in times.items() if "error" in t]
    if not problems:
        ratio = times["plain_forward"]["median_ms"] / times["variability"]["median_ms"]
        res["throughput_x_plain"] = ratio
        run.data.setdefault("targets", {})["variability: tokens/s vs plain forward"] = {
            "value": ratio, "target": ">= 0.9", "met": ratio >= 0.9}
    if not res["check"].get("ok"):
        problems.insert(0, "agreement")
    if problems:
        res["status"] = "failed (" + "; ".join(problems) + ")"
    del model, batches
    free(dev)


# --------------------------------------------------------------------------------------------------
# profile: where the time of a Fisher step and of a variability batch goes (the reasons behind misses)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The summary table
# --------------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def summary_lines(data: dict, steps: list[tuple[str, str, str]] | None = None) -> list[str]:
    """The short table: steps (from gpu_check.sh), sections, headline numbers, targets."""
    lines = []
    title = f"gpu_check summary ({'dry, ' if data.get('dry') else ''}{data.get('gpu') or data.get('device', '?')})"
    lines += [title, "-" * len(title)]
    if steps:
        lines.append(f"{'step':<12} {'status':<60} {'s':>6}")
        for name, status, secs in steps:
            lines.append(f"{name:<12} {status:<60} {secs:>6}")
        lines.append("")
    secs = data.get("sections", {})
    if secs:
        lines.append(f"{'section':<12} {'status':<60} {'s':>6}")
        for name, s in secs.items():
            status = s.get("status", "?")
            if "error" in s:
                status += f": {s['error']}"
            lines.append(f"{name:<12} {status[:120]:<60} {_fmt(s.get('seconds', '')):>6}")
        lines.append("")
    g = secs.get("gemm", {})
    if "bf16_tflops" in g:
        lines.append(f"GEMM bf16 {g['bf16_tflops']:.1f} TFLOP/s, fp32 {g['fp32_tflops']:.1f} TFLOP/s, copy {g['copy_gbps']:.0f} GB/s")
    lin = secs.get("linear", {})
    for dname, per in lin.get("winners", {}).items():
        lines.append(f"linear winners {dname}: " + ", ".join(f"{c}: {w}" for c, w in sorted(per.items())))
    if lin.get("checks_failed"):
        lines.append(f"linear checks FAILED: {len(lin['checks_failed'])} (first: {lin['checks_failed'][0]})")
    fis = secs.get("fisher", {})
    if fis.get("methods"):
        lines.append("fisher (ms median, extra MiB): " + ", ".join(
            f"{n} {_fmt(m.get('median_ms'))}/{_fmt(m.get('extra_mib'))}" for n, m in fis["methods"].items() if "median_ms" in m))
    var = secs.get("variability", {})
    if var.get("methods"):
        lines.append("variability tokens/s: " + ", ".join(f"{n} {m['tokens_per_s']:.0f}" for n, m in var["methods"].items()))
    if data.get("skipped_no_gpu"):
        lines.append("skipped (no GPU): " + "; ".join(data["skipped_no_gpu"]))
    tg = data.get("targets", {})
    if tg:
        lines.append("")
        lines.append(f"{'target':<44} {'value':>9} {'want':<40} met")
        for name, t in tg.items():
            met = "(dry)" if data.get("dry") else "yes" if t.get("met") else "NO"
            lines.append(f"{name:<44} {_fmt(t.get('value')):>9} {str(t.get('target')):<40} {met}")
    return lines


def read_steps(path: Path) -> list[tuple[str, str, str]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            rows.append((parts[0], parts[1], parts[2]))
    return rows


def print_summary(out_dir: Path) -> int:
    path = out_dir / "gpu_check.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        data = {"sections": {}, "note": f"no {path}: {exc}"}
    lines = summary_lines(data, read_steps(out_dir / "steps.tsv"))
    if "note" in data:
        lines.append(data["note"])
    print("\n".join(lines))
    return 0


SECTIONS: dict[str, Callable[[Run, dict], None]] = {
    "env": section_env,
    "gemm": section_gemm,
    "linear": section_linear,
    "error": section_error,
    "fisher": section_fisher,
    "variability": section_variability,
    "profile": section_profile,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fastsel: every GPU timing in one process (see the module docstring)")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes; CUDA-only parts reported as skipped")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu_check"))
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--budget-s", type=float, default=None, help="wall-time budget of the whole run (default 240; dry 150)")
    ap.add_argument("--summary", action="store_true", help="only print the summary table of OUT/gpu_check.json")
    ap.add_argument("--bert-batch-size", type=int, default=None,
                    help="examples per batch of the BERT model of the fisher/variability/profile sections (default 32)")
    ap.add_argument("--bert-seq-len", type=int, default=None, help="tokens per example there (default 128)")
    ap.add_argument("--resume", action="store_true", help="keep the sections already in OUT/gpu_check.json (used "
                    "internally: after a section breaks the CUDA context the rest run in a fresh process)")
    args = ap.parse_args(argv)
    if args.summary:
        return print_summary(args.out)
    device = torch.device(args.device or ("cpu" if args.dry else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (use --dry on a CPU)", file=sys.stderr)
        return 2
    if args.dry:
        torch.manual_seed(0)
    budget = args.budget_s or (150.0 if args.dry else 240.0)
    run = Run(args.out, args.dry, device, budget, resume=args.resume)
    for key, value in (("batch_size", args.bert_batch_size), ("seq_len", args.bert_seq_len)):
        if value is not None:  # another regime of the same model (e.g. GPU-bound rather than launch-bound)
            run.cfg["bert"][key] = value
            run.data.setdefault("bert_override", {})[key] = value
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    for name in wanted:
        if name not in SECTIONS:
            print(f"gpu_check: unknown section {name!r}", file=sys.stderr)
            return 2
    order = ([] if args.resume else ["env"]) + [s for s in wanted if s != "env" or args.resume]
    for i, name in enumerate(order):
        run.section(name, SECTIONS[name])
        rest = order[i + 1:]
        if run.data["sections"][name].get("cuda_context_broken") and rest and run.data.get("resumed", 0) < 3:
            # every later CUDA call would fail: the remaining sections in a fresh process (same JSON)
            left = max(30.0, run.deadline - time.monotonic())
            print(f"gpu_check: CUDA context broken in section {name}; restarting for {', '.join(rest)}", flush=True)
            sys.stdout.flush()
            sys.stderr.flush()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--sections", ",".join(rest),
                   "--resume", "--budget-s", f"{left:.0f}", "--device", str(device)] + (["--dry"] if args.dry else []) \
                + ([f"--bert-batch-size={args.bert_batch_size}"] if args.bert_batch_size else []) \
                + ([f"--bert-seq-len={args.bert_seq_len}"] if args.bert_seq_len else [])
            os.execv(sys.executable, cmd)
    run.data["seconds"] = round(time.monotonic() - run.t0, 1)
    run.save()
    print()
    print("\n".join(summary_lines(run.data)))
    failed = [n for n, s in run.data["sections"].items() if str(s.get("status", "")).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
