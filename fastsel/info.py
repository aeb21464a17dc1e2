"""What ``fastsel info`` reports: versions, and which backend each op runs on (and why)."""
from __future__ import annotations

import platform
from typing import Any

import torch

import fastsel
from fastsel._backend import EXTENSION, op_backend
from fastsel.ops import OPS

__all__ = ["info", "format_info"]


def info() -> dict[str, Any]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = {}
    for op in OPS:
        ops[op] = {dev: dict(zip(("backend", "reason"), op_backend(op, dev))) for dev in devices}
    return {
        "fastsel": fastsel.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extension": {"loaded": EXTENSION.loaded, "cuda_kernels": EXTENSION.cuda, "reason": EXTENSION.reason},
        "ops": ops,
    }


def format_info(data: dict[str, Any]) -> str:
    lines = [
        f"fastsel {data['fastsel']}  (python {data['python']}, torch {data['torch']}, CUDA {data['torch_cuda'] or 'none'})",
        f"GPU: {data['gpu'] or 'none visible'}",
        f"extension fastsel._C: {'loaded' if data['extension']['loaded'] else 'NOT loaded'} -- {data['extension']['reason']}",
        "ops:",
    ]
    for op, per_dev in data["ops"].items():
        for dev, b in per_dev.items():
            lines.append(f"  {op:<32} {dev:<5} {b['backend']:<10} {b['reason']}")
    return "\n".join(lines)
