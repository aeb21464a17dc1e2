"""The LayerNorm op (fastsel.ops.layer_norm) against per-example autograd gradients in float64 and its reference."""
from __future__ import annotations

import pytest
import torch
from oracles import DEVICES, DTYPES, needs_ext
from torch.testing import assert_close

from fastsel import ops

IMPLS = {"wrapper": ops.accumulate_layer_norm_sq_grad, "ref": ops.accumulate_layer_norm_sq_grad_ref}
WHICH = ["both", "weight", "bias"]


def oracle_layer_norm(g: torch.Tensor, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_b (d l_b / d weight)^2 and (d l_b / d bias)^2 of l_b = sum(g_b * layer_norm(x_b, weight, bias)), one example
    at a time by autograd in float64 (an oracle that shares no code with the op)."""
    D = x.shape[-1]
    w = torch.ones(D, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    sw, sb = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    for gb, xb in zip(g.double().cpu(), x.double().cpu()):
        y = torch.nn.functional.layer_norm(xb, (D,), w, b, eps)
        dw, db = torch.autograd.grad((gb * y).sum(), (w, b))
        sw += dw.square()
        sb += db.square()
    return sw.float(), sb.float()


def outs(which: str, D: int, device, fill: float = 0.0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    w = torch.full((D,), fill, device=device) if which in ("both", "weight") else None
    b = torch.full((D,), fill, device=device) if which in ("both", "bias") else None
    return w, b


def data(shape, dtype, device, seed=0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(*shape, generator=gen).to(device, dtype)
    x = (torch.randn(*shape, generator=gen) * 2 + offset).to(device, dtype)
    return g, x


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("shape", [(4, 6, 37), (3, 1, 8), (2, 5, 3, 16), (3, 4, 1100), (1, 7, 2)], ids=str)
def test_layer_norm_matches_per_example_autograd(impl, device, dtype, which, shape):
    g, x = data(shape, dtype, device, seed=sum(shape))
    w, b = outs(which, shape[-1], device, fill=0.5)  # adds onto what is there
    IMPLS[impl](w, b, g, x, 1e-5)
    want_w, want_b = oracle_layer_norm(g, x, 1e-5)
    if w is not None:
        assert_close(w.cpu(), want_w + 0.5, rtol=1e-4, atol=1e-4)
    if b is not None:
        assert_close(b.cpu(), want_b + 0.5, rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference(device, dtype):
    g, x = data((5, 11, 70), dtype, device, seed=2)
    k, r = outs("both", 70, device), outs("both", 70, device)
    torch.ops.fastsel.accumulate_layer_norm_sq_grad(*k, g, x, 1e-6)
    ops.accumulate_layer_norm_sq_grad_ref(*r, g, x, 1e-6)
    for a, c in zip(k, r):
        assert_close(a, c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_large_offset_and_constant_rows(impl):
    """Rows far from zero (a mean of 1e3 against a spread of 1) and constant rows (var 0: x_hat = 0, eps alone)."""
    g, x = data((3, 5, 24), torch.float32, "cpu", seed=5, offset=1e3)
    x[1, 2] = 7.0  # a constant row
    w, b = outs("both", 24, "cpu")
    IMPLS[impl](w, b, g, x, 1e-5)
    want_w, want_b = oracle_layer_norm(g, x, 1e-5)
    assert_close(w, want_w, rtol=2e-3, atol=1e-3)  # fp32 input: x - mean keeps ~4 digits of a 1e3 offset
    assert_close(b, want_b)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_non_contiguous_inputs(impl):
    g, x = data((6, 4, 9), torch.float32, "cpu", seed=7)
    gt, xt = g.transpose(0, 1).contiguous().transpose(0, 1), x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not gt.is_contiguous()
    a, c = outs("both", 9, "cpu"), outs("both", 9, "cpu")
    IMPLS[impl](*a, gt, xt, 1e-5)
    IMPLS[impl](*c, g, x, 1e-5)
    for p, q in zip(a, c):
        assert_close(p, q)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_empty_batch_adds_nothing(impl):
    g, x = torch.zeros(0, 3, 5), torch.zeros(0, 3, 5)
    w, b = outs("both", 5, "cpu", fill=1.0)
    IMPLS[impl](w, b, g, x, 1e-5)
    assert torch.equal(w, torch.ones(5)) and torch.equal(b, torch.ones(5))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bad_input(impl):
    g, x = data((2, 3, 4), torch.float32, "cpu")
    err = (ValueError, RuntimeError)
    with pytest.raises(err, match="neither"):
        IMPLS[impl](None, None, g, x, 1e-5)
    with pytest.raises(err, match="same shape"):
        IMPLS[impl](*outs("both", 4, "cpu"), g, x[:, :2], 1e-5)
    with pytest.raises(err, match="eps"):
        IMPLS[impl](*outs("both", 4, "cpu"), g, x, -1.0)
    with pytest.raises(err, match="float32"):
        IMPLS[impl](torch.zeros(4, dtype=torch.float64), None, g, x, 1e-5)
    with pytest.raises(err, match=r"\(D,\)|\(4,\)"):
        IMPLS[impl](None, torch.zeros(5), g, x, 1e-5)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", WHICH)
def test_opcheck(device, which):
    g, x = data((3, 4, 6), torch.float32, device)
    torch.library.opcheck(torch.ops.fastsel.accumulate_layer_norm_sq_grad.default, (*outs(which, 6, device), g, x, 1e-5))
    gh, xh = data((3, 4, 6), torch.bfloat16, device)
    torch.library.opcheck(torch.ops.fastsel.accumulate_layer_norm_sq_grad.default, (*outs(which, 6, device), gh, xh, 1e-5))
