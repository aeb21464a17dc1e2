"""Section gemm: the measured ceilings (bf16 and fp32 GEMM TFLOP/s, device-to-device copy GB/s), against which
the other sections' numbers are read."""
from __future__ import annotations

import torch

from ..config import DTYPES
from ..harness import bench, free
from ..run import Run


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
