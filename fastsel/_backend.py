"""Loading of the compiled extension, and which backend each op runs on.

fastsel never fails to import because fastsel._C is missing or broken: every op then runs its
pure-torch reference and ``fastsel info`` says why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["EXTENSION", "ExtensionStatus", "op_backend", "FORCE_REFERENCE_ENV"]

FORCE_REFERENCE_ENV = "FASTSEL_BACKEND"  # "reference" forces the pure-torch path everywhere


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    cuda: bool
    reason: str


def _load() -> ExtensionStatus:
    if os.environ.get(FORCE_REFERENCE_ENV, "").lower() == "reference":
        return ExtensionStatus(False, False, f"{FORCE_REFERENCE_ENV}=reference")
    try:
        from fastsel import _C  # noqa: F401  (registers torch.ops.fastsel.*)
    except Exception as exc:  # ImportError, or an undefined-symbol OSError from an ABI mismatch
        return ExtensionStatus(False, False, f"fastsel._C not importable: {type(exc).__name__}: {exc}")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("fastsel::accumulate_linear_sq_grad", "CUDA")
    return ExtensionStatus(True, has_cuda, "compiled extension loaded" + (" with CUDA kernels" if has_cuda else " (CPU kernels only)"))


EXTENSION: ExtensionStatus = _load()


def op_backend(op_name: str, device: torch.device | str) -> tuple[str, str]:
    """(backend, reason) for running ``fastsel::op_name`` on ``device``: 'cuda', 'cpu' or 'reference'."""
    device = torch.device(device)
    if not EXTENSION.loaded:
        return "reference", EXTENSION.reason
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    if key is None:
        return "reference", f"no kernel for device type {device.type!r}"
    qualname = f"fastsel::{op_name}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
        why = "extension built without CUDA kernels" if key == "CUDA" else f"{qualname} has no {key} kernel"
        return "reference", why
    return key.lower(), f"compiled {key} kernel"
