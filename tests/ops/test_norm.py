"""The scale/bias op (fastsel.ops.norm) against its reference and a float64 oracle."""
from __future__ import annotations

import pytest
import torch
from oracles import DEVICES, DTYPES, tol
from torch.testing import assert_close

from fastsel import ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_input", [True, False])
def test_norm_matches_oracle(device, dtype, with_input):
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(4, 6, 37, generator=gen).to(device, dtype)
    x = torch.randn(4, 6, 37, generator=gen).to(device, dtype) if with_input else None
    out, ref = torch.zeros(37, device=device), torch.zeros(37, device=device)
    ops.accumulate_norm_sq_grad(out, g, x)
    ops.accumulate_norm_sq_grad_ref(ref, g, x)
    assert_close(out, ref, **tol(dtype))
    prod = g.double() * (x.double() if with_input else 1.0)
    assert_close(out.cpu(), prod.sum(1).square().sum(0).float().cpu(), rtol=1e-4, atol=1e-5)
