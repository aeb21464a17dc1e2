"""Shared helpers of the op tests: devices, dtypes and the float64 per-example oracles."""
from __future__ import annotations

import pytest
import torch

from fastsel.ops.backend import EXTENSION, linear_backends_available

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


needs_ext = pytest.mark.skipif(not EXTENSION.loaded, reason=f"extension not loaded: {EXTENSION.reason}")


def oracle_linear(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_b (g_b^T x_b)^2 in float64, one example at a time."""
    g, x = g.double().reshape(g.shape[0], -1, g.shape[-1]), x.double().reshape(x.shape[0], -1, x.shape[-1])
    return sum((g[b].T @ x[b]).square() for b in range(g.shape[0])).float()


def oracle_embedding(g: torch.Tensor, idx: torch.Tensor, V: int, pad: int) -> torch.Tensor:
    out = torch.zeros(V, g.shape[-1], dtype=torch.float64)
    for b in range(g.shape[0]):
        per_example = torch.zeros(V, g.shape[-1], dtype=torch.float64)
        per_example.index_add_(0, idx[b].reshape(-1).long(), g[b].reshape(-1, g.shape[-1]).double())
        if pad >= 0:
            per_example[pad] = 0
        out += per_example.square()
    return out.float()


def tol(dtype: torch.dtype) -> dict:
    # inputs are cast to fp32 exactly; only the summation order differs
    return dict(rtol=2e-5, atol=1e-5)


def linear_backend_params() -> list:
    """(device, backend) pairs that can run here; ids carry the device so `-k cuda` selects the GPU ones."""
    pairs = []
    for device in DEVICES:
        for name in linear_backends_available(device):
            if name != "reference":
                pairs.append(pytest.param(device, name, id=f"{device}-{name}"))
    return pairs
