"""What ``fastsel info`` reports: versions, and which backend each op runs on (and why)."""
from __future__ import annotations

import os
import platform
from typing import Any

import torch

import fastsel
from fastsel.ops import OPS, backend
from fastsel.ops.backend import EXTENSION, linear_backends_available, op_backend, triton_backend_status, triton_status

__all__ = ["info", "format_info", "cuda_build_problems", "main"]


def info() -> dict[str, Any]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = {}
    for op in OPS:
        ops[op] = {dev: dict(zip(("backend", "reason"), op_backend(op, dev))) for dev in devices}
    linear_cuda = None
    if torch.cuda.is_available():
        # Which backend the measured table picks for a typical encoder call (B=32, T=128, 768x768, bf16).
        try:
            args = (torch.device("cuda"), torch.bfloat16, 32, 128, 768, 768)
            linear_cuda = {"shape": "bf16 B=32 T=128 768x768",
                           "backend": backend.choose_linear_backend(*args),
                           "reason": backend.explain_linear_default(*args)}
        except AttributeError:  # the backend module renamed its helpers
            linear_cuda = None
        except (RuntimeError, ValueError) as exc:
            linear_cuda = {"shape": "bf16 B=32 T=128 768x768", "backend": None, "reason": f"{type(exc).__name__}: {exc}"}
    triton_version, triton_why = triton_status()
    triton = {"version": triton_version, "reason": triton_why,
              "devices": {dev: dict(zip(("available", "reason"), triton_backend_status(dev))) for dev in devices}}
    return {
        "fastsel": fastsel.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extension": {
            "loaded": EXTENSION.loaded,
            "cuda_kernels": EXTENSION.cuda,
            "reason": EXTENSION.reason,
            "built_with_torch": getattr(EXTENSION, "built_with_torch", None),
            "built_with_cuda": getattr(EXTENSION, "built_with_cuda", None),
            "cuda_archs": getattr(EXTENSION, "cuda_archs", None),
        },
        "torch_mismatch": _mismatch(),
        "ops": ops,
        "linear_backends": {dev: list(linear_backends_available(dev)) for dev in devices},
        "triton": triton,
        "linear_cuda_default": linear_cuda,
    }


def _mismatch() -> str | None:
    check = getattr(backend, "torch_mismatch", None)
    return check() if check is not None else None


def format_info(data: dict[str, Any]) -> str:
    ext = data["extension"]
    built = "built against torch " + (ext.get("built_with_torch") or "unknown")
    if ext.get("built_with_cuda"):
        built += f", CUDA {ext['built_with_cuda']}, arches {ext.get('cuda_archs') or 'unknown'}"
    elif ext["loaded"]:
        built += ", no CUDA kernels"
    lines = [
        f"fastsel {data['fastsel']}  (python {data['python']}, torch {data['torch']}, CUDA {data['torch_cuda'] or 'none'})",
        f"GPU: {data['gpu'] or 'none visible'}",
        f"extension fastsel._C: {'loaded' if ext['loaded'] else 'NOT loaded'} -- {ext['reason']}",
    ]
    if ext["loaded"]:
        lines.append(f"  {built}")
    if data.get("torch_mismatch"):
        lines.append(f"WARNING: {data['torch_mismatch']}")
    lines.append("ops:")
    for op, per_dev in data["ops"].items():
        for dev, b in per_dev.items():
            lines.append(f"  {op:<32} {dev:<5} {b['backend']:<10} {b['reason']}")
    for dev, names in data.get("linear_backends", {}).items():
        lines.append(f"linear op backends on {dev}: {', '.join(names)}")
    tri = data.get("triton")
    if tri:
        lines.append(f"triton backend (linear op): {tri['reason']}")
        for dev, b in tri["devices"].items():
            lines.append(f"  {dev:<5} {'available' if b['available'] else 'unavailable':<11} {b['reason']}")
    lin = data.get("linear_cuda_default")
    if lin:
        lines.append(f"linear op on cuda ({lin['shape']}): {lin['backend']} -- {lin['reason']}")
    return "\n".join(lines)


def cuda_build_problems(data: dict[str, Any] | None = None) -> list[str]:
    """Why this install is not a working CUDA build of fastsel (empty: it is): the extension must load,
    have been compiled with CUDA kernels, and register a CUDA kernel for every op in fastsel.ops.OPS."""
    data = info() if data is None else data
    ext = data["extension"]
    if not ext["loaded"]:
        return [f"fastsel._C not loaded: {ext['reason']}"]
    problems = []
    if not ext.get("built_with_cuda"):
        problems.append("fastsel._C reports no CUDA toolkit (built_with_cuda unset): built without CUDA kernels")
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastsel::{op}", "CUDA")]
    if missing:
        problems.append(f"no CUDA kernel registered for: {', '.join(missing)}")
    if data.get("torch_mismatch"):
        problems.append(data["torch_mismatch"])
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m fastsel.cli.info [--json] [--require-cuda]``; --require-cuda exits 1 unless a CUDA build."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m fastsel.cli.info")
    p.add_argument("--json", action="store_true")
    p.add_argument("--require-cuda", action="store_true",
                   help="fail unless the extension loaded with CUDA kernels for every op")
    args = p.parse_args(argv)
    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    if args.require_cuda:
        problems = cuda_build_problems(data)
        where = os.path.dirname(fastsel.__file__)
        if problems:
            for line in problems:
                print(f"error: {line} (fastsel at {where})")
            return 1
        ext = data["extension"]
        print(f"OK: CUDA build of fastsel at {where}: torch {ext['built_with_torch']}, CUDA {ext['built_with_cuda']}, "
              f"arches {ext['cuda_archs']}, CUDA kernels for {', '.join(OPS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
