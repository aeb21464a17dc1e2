"""The linear op (fastsel.ops.linear) and each of its backends against the float64 per-example oracle."""
from __future__ import annotations

import pytest
import torch
from oracles import DEVICES, DTYPES, linear_backend_params, oracle_linear, tol
from torch.testing import assert_close

from fastsel import ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (1, 1, 2, 3), (4, 1, 7, 2), (2, 17, 33, 65), (5, 3, 130, 9)])
def test_linear_matches_oracle(device, dtype, shape):
    B, T, O, I = shape
    gen = torch.Generator().manual_seed(sum(shape))
    g = torch.randn(B, T, O, generator=gen).to(device, dtype)
    x = torch.randn(B, T, I, generator=gen).to(device, dtype)
    out, ref = torch.zeros(O, I, device=device), torch.zeros(O, I, device=device)
    ops.accumulate_linear_sq_grad(out, g, x)
    ops.accumulate_linear_sq_grad_ref(ref, g, x)
    assert_close(out, ref, **tol(dtype))
    assert_close(out.cpu(), oracle_linear(g.cpu(), x.cpu()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_accumulate_across_calls(device):
    g, x = torch.randn(3, 4, 5, device=device), torch.randn(3, 4, 6, device=device)
    once, twice = torch.zeros(5, 6, device=device), torch.zeros(5, 6, device=device)
    ops.accumulate_linear_sq_grad(once, torch.cat([g, g]), torch.cat([x, x]))
    ops.accumulate_linear_sq_grad(twice, g, x)
    ops.accumulate_linear_sq_grad(twice, g, x)
    assert_close(once, twice)


@pytest.mark.parametrize("device", DEVICES)
def test_extra_middle_dims_are_positions(device):
    g, x = torch.randn(2, 3, 4, 5, device=device), torch.randn(2, 3, 4, 6, device=device)
    out = torch.zeros(5, 6, device=device)
    ops.accumulate_linear_sq_grad(out, g, x)
    assert_close(out.cpu(), oracle_linear(g.cpu(), x.cpu()), rtol=1e-4, atol=1e-5)


LINEAR_SHAPES = [(3, 5, 4, 6), (4, 1, 7, 2), (2, 17, 33, 65), (3, 40, 136, 264), (5, 16, 64, 128), (2, 33, 72, 40), (6, 9, 70, 130)]


@pytest.mark.parametrize("device,backend", linear_backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_backends_match_oracle(device, backend, dtype, shape):
    B, T, O, I = shape
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    g = torch.randn(B, T, O, generator=gen).to(device, dtype)
    x = torch.randn(B, T, I, generator=gen).to(device, dtype)
    out = torch.full((O, I), 0.5, device=device)  # accumulates onto what is there
    ops.accumulate_linear_sq_grad(out, g, x, backend=backend)
    assert_close(out.cpu(), oracle_linear(g.cpu(), x.cpu()) + 0.5, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", linear_backend_params())
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_linear_backends_mixed_dtypes_compute_in_the_half_type(device, backend, half):
    """Under autocast a linear's input can be fp32 (a LayerNorm output) while its grad_output is half."""
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(4, 24, 40, generator=gen).to(device, half)
    x = torch.randn(4, 24, 48, generator=gen).to(device)  # fp32
    out = torch.zeros(40, 48, device=device)
    ops.accumulate_linear_sq_grad(out, g, x, backend=backend)
    half_type = device == "cuda" or backend in ("bmm", "triton")  # the CPU kernel computes in fp32
    expected = oracle_linear(g.cpu(), x.to(half).cpu()) if half_type else oracle_linear(g.cpu(), x.cpu())
    assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_bmm_backend_bounded_workspace_gives_the_same_sums():
    gen = torch.Generator().manual_seed(4)
    g, x = torch.randn(7, 6, 10, generator=gen), torch.randn(7, 6, 12, generator=gen)
    whole, chunked = torch.zeros(10, 12), torch.zeros(10, 12)
    ops.accumulate_linear_sq_grad_bmm(whole, g, x)
    ops.accumulate_linear_sq_grad_bmm(chunked, g, x, workspace_bytes=2 * 4 * 10 * 12)  # two examples at a time
    assert_close(chunked, whole)
    assert_close(whole, oracle_linear(g, x), rtol=1e-4, atol=1e-5)


def test_bmm_backend_empty_and_bad_inputs():
    out = torch.ones(3, 4)
    ops.accumulate_linear_sq_grad_bmm(out, torch.randn(0, 5, 3), torch.randn(0, 5, 4))
    assert out.eq(1).all()
    with pytest.raises(ValueError, match="equal leading"):
        ops.accumulate_linear_sq_grad_bmm(out, torch.randn(2, 5, 3), torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match="out must"):
        ops.accumulate_linear_sq_grad_bmm(torch.zeros(4, 4), torch.randn(2, 5, 3), torch.randn(2, 5, 4))


def test_backend_argument_is_validated():
    out, g, x = torch.zeros(3, 4), torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.accumulate_linear_sq_grad(out, g, x, backend="cublas")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        ops.accumulate_linear_sq_grad(out, g, x, backend="pipelined")
