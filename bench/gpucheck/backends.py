"""Choosing what a measured call runs: one backend of fastsel's linear op (directly, or for a whole Fisher pass
through FASTSEL_BACKEND), the backends this device has, and bf16 autocast (the precision the GPU sections
measure in)."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch

LINEAR_ENV = "accumulate_linear_sq_grad"


def linear_call(name: str) -> Callable:
    """``call(out, g, x)``: accumulate_linear_sq_grad with backend ``name``, forced (not the auto choice)."""
    from fastsel import ops

    def call(out, g, x):
        ops.accumulate_linear_sq_grad(out, g, x, backend=name)

    return call


def linear_variants(device: torch.device) -> list[str]:
    """The linear backends this device can run, less the pure-torch reference (the one the others are checked against)."""
    from fastsel.ops.backend import linear_backends_available

    return [b for b in linear_backends_available(device) if b != "reference"]


@contextlib.contextmanager
def linear_backend_env(name: str | None) -> Iterator[None]:
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


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bf16 autocast on ``device`` (``enabled=False``: fp32, the precision of the oracles)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
