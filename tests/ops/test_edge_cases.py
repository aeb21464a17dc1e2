"""Edge cases of the per-example squared-gradient ops: non-contiguous, empty, bad inputs, random shapes; opcheck."""
from __future__ import annotations

import pytest
import torch
from oracles import DEVICES, DTYPES, needs_ext, oracle_embedding, oracle_linear
from torch.testing import assert_close

from fastsel import ops


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(6, 5, 4, generator=gen).to(device).transpose(1, 2)  # (B, T=4, O=5), strided
    x = torch.randn(6, 3, 4, generator=gen).to(device).transpose(1, 2)  # (B, T=4, I=3)
    assert not g.is_contiguous() and not x.is_contiguous()
    out = torch.zeros(5, 3, device=device)
    ops.accumulate_linear_sq_grad(out, g, x)
    assert_close(out.cpu(), oracle_linear(g.cpu(), x.cpu()), rtol=1e-4, atol=1e-5)

    idx = torch.randint(0, 7, (4, 6), generator=gen).to(device).T  # (6, 4) non-contiguous
    ge = torch.randn(4, 6, 8, generator=gen).to(device).transpose(0, 1)
    out_e = torch.zeros(7, 8, device=device)
    ops.accumulate_embedding_sq_grad(out_e, ge, idx, -1)
    assert_close(out_e.cpu(), oracle_embedding(ge.cpu(), idx.cpu(), 7, -1), rtol=1e-4, atol=1e-5)

    n = torch.zeros(4, device=device)
    gn = torch.randn(3, 4, 5, device=device).transpose(1, 2)
    xn = torch.randn(3, 4, 5, device=device).transpose(1, 2)
    ops.accumulate_norm_sq_grad(n, gn, xn)
    assert_close(n, (gn * xn).sum(1).square().sum(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_ref", [False, True])
def test_empty_batch_is_a_no_op(device, use_ref):
    lin = ops.accumulate_linear_sq_grad_ref if use_ref else ops.accumulate_linear_sq_grad
    emb = ops.accumulate_embedding_sq_grad_ref if use_ref else ops.accumulate_embedding_sq_grad
    nrm = ops.accumulate_norm_sq_grad_ref if use_ref else ops.accumulate_norm_sq_grad
    out = torch.ones(3, 4, device=device)
    lin(out, torch.randn(0, 5, 3, device=device), torch.randn(0, 5, 4, device=device))
    emb(out, torch.randn(0, 5, 4, device=device), torch.zeros(0, 5, dtype=torch.long, device=device), -1)
    v = torch.ones(4, device=device)
    nrm(v, torch.randn(0, 5, 4, device=device), None)
    assert out.eq(1).all() and v.eq(1).all()


@pytest.mark.parametrize("use_ref", [False, True])
def test_bad_inputs_give_clear_errors(use_ref):
    lin = ops.accumulate_linear_sq_grad_ref if use_ref else ops.accumulate_linear_sq_grad
    emb = ops.accumulate_embedding_sq_grad_ref if use_ref else ops.accumulate_embedding_sq_grad
    with pytest.raises((RuntimeError, ValueError), match="out must"):
        lin(torch.zeros(4, 4), torch.randn(2, 3, 5), torch.randn(2, 3, 4))
    with pytest.raises((RuntimeError, ValueError), match="float32"):
        lin(torch.zeros(5, 4, dtype=torch.float64), torch.randn(2, 3, 5), torch.randn(2, 3, 4))
    with pytest.raises((RuntimeError, ValueError), match="disagree|equal leading"):
        lin(torch.zeros(5, 4), torch.randn(2, 3, 5), torch.randn(3, 3, 4))
    with pytest.raises((RuntimeError, ValueError), match="out of range"):
        emb(torch.zeros(4, 2), torch.randn(1, 3, 2), torch.tensor([[0, 1, 9]]), -1)
    with pytest.raises((RuntimeError, ValueError), match="int64 or int32"):
        emb(torch.zeros(4, 2), torch.randn(1, 3, 2), torch.tensor([[0.0, 1.0, 2.0]]), -1)


def test_fuzz_against_reference():
    """Random shapes and dtypes: the dispatched op (the compiled kernel here; the reference twin where the extension
    is missing) against the float64 per-example oracles, and against the reference twin when they differ."""
    gen = torch.Generator().manual_seed(11)
    for trial in range(25):
        B, T, O, I = (int(v) for v in torch.randint(1, 40, (4,), generator=gen))
        dtype = DTYPES[trial % 3]
        g = torch.randn(B, T, O, generator=gen).to(dtype)
        x = torch.randn(B, T, I, generator=gen).to(dtype)
        out, ref = torch.zeros(O, I), torch.zeros(O, I)
        ops.accumulate_linear_sq_grad(out, g, x)
        ops.accumulate_linear_sq_grad_ref(ref, g, x)
        assert_close(out, oracle_linear(g, x), rtol=1e-4, atol=1e-5)  # the oracle sums in float64
        assert_close(out, ref, rtol=2e-5, atol=1e-5)
        V = int(torch.randint(1, 50, (1,), generator=gen))
        idx = torch.randint(0, V, (B, T), generator=gen)
        oe, re_ = torch.zeros(V, O), torch.zeros(V, O)
        ops.accumulate_embedding_sq_grad(oe, g, idx, trial % V - 1)
        ops.accumulate_embedding_sq_grad_ref(re_, g, idx, trial % V - 1)
        assert_close(oe, oracle_embedding(g, idx, V, trial % V - 1), rtol=1e-4, atol=1e-5)
        assert_close(oe, re_, rtol=2e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g, x = torch.randn(3, 4, 5, device=device), torch.randn(3, 4, 6, device=device)
    torch.library.opcheck(torch.ops.fastsel.accumulate_linear_sq_grad.default, (torch.zeros(5, 6, device=device), g, x))
    for variant in (1, 2):
        torch.library.opcheck(torch.ops.fastsel.accumulate_linear_sq_grad.default,
                              (torch.zeros(5, 6, device=device), g.bfloat16(), x.bfloat16(), variant))
    torch.library.opcheck(torch.ops.fastsel.accumulate_norm_sq_grad.default, (torch.zeros(5, device=device), g, None))
    torch.library.opcheck(torch.ops.fastsel.accumulate_norm_sq_grad.default, (torch.zeros(5, device=device), g, g.clone()))
    idx = torch.randint(0, 7, (3, 4), device=device)
    torch.library.opcheck(torch.ops.fastsel.accumulate_embedding_sq_grad.default, (torch.zeros(7, 5, device=device), g, idx, 2))
