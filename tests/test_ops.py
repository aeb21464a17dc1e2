"""The per-example squared-gradient ops against their *_ref twins and a float64 per-example oracle."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fastsel import ops
from fastsel._backend import EXTENSION, linear_backends_available

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


def _tol(dtype: torch.dtype) -> dict:
    # inputs are cast to fp32 exactly; only the summation order differs
    return dict(rtol=2e-5, atol=1e-5)


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
    assert_close(out, ref, **_tol(dtype))
    assert_close(out.cpu(), oracle_linear(g.cpu(), x.cpu()), rtol=1e-4, atol=1e-5)


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
    assert_close(out, ref, **_tol(dtype))
    prod = g.double() * (x.double() if with_input else 1.0)
    assert_close(out.cpu(), prod.sum(1).square().sum(0).float().cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx", [-1, 0, 3])
def test_embedding_repeated_tokens_and_padding(device, dtype, padding_idx):
    gen = torch.Generator().manual_seed(5)
    V, D = 11, 13
    idx = torch.randint(0, 5, (6, 9), generator=gen)  # small range: many tokens repeat within an example
    g = torch.randn(6, 9, D, generator=gen).to(dtype)
    out, ref = torch.zeros(V, D, device=device), torch.zeros(V, D, device=device)
    ops.accumulate_embedding_sq_grad(out, g.to(device), idx.to(device), padding_idx)
    ops.accumulate_embedding_sq_grad_ref(ref, g.to(device), idx.to(device), padding_idx)
    assert_close(out, ref, **_tol(dtype))
    assert_close(out.cpu(), oracle_embedding(g, idx, V, padding_idx), rtol=1e-4, atol=1e-5)
    if padding_idx >= 0:
        assert out[padding_idx].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_ops_accumulate_across_calls(device):
    g, x = torch.randn(3, 4, 5, device=device), torch.randn(3, 4, 6, device=device)
    once, twice = torch.zeros(5, 6, device=device), torch.zeros(5, 6, device=device)
    ops.accumulate_linear_sq_grad(once, torch.cat([g, g]), torch.cat([x, x]))
    ops.accumulate_linear_sq_grad(twice, g, x)
    ops.accumulate_linear_sq_grad(twice, g, x)
    assert_close(once, twice)


# -- every backend of the linear op ------------------------------------------------------------------


def _linear_backend_params() -> list:
    """(device, backend) pairs that can run here; ids carry the device so `-k cuda` selects the GPU ones."""
    pairs = []
    for device in DEVICES:
        for name in linear_backends_available(device):
            if name != "reference":
                pairs.append(pytest.param(device, name, id=f"{device}-{name}"))
    return pairs


LINEAR_SHAPES = [(3, 5, 4, 6), (4, 1, 7, 2), (2, 17, 33, 65), (3, 40, 136, 264), (5, 16, 64, 128), (2, 33, 72, 40), (6, 9, 70, 130)]


@pytest.mark.parametrize("device,backend", _linear_backend_params())
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


@pytest.mark.parametrize("device,backend", _linear_backend_params())
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_linear_backends_mixed_dtypes_compute_in_the_half_type(device, backend, half):
    """Under autocast a linear's input can be fp32 (a LayerNorm output) while its grad_output is half."""
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(4, 24, 40, generator=gen).to(device, half)
    x = torch.randn(4, 24, 48, generator=gen).to(device)  # fp32
    out = torch.zeros(40, 48, device=device)
    ops.accumulate_linear_sq_grad(out, g, x, backend=backend)
    expected = oracle_linear(g.cpu(), x.to(half).cpu()) if device == "cuda" or backend == "bmm" else oracle_linear(g.cpu(), x.cpu())
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


# -- edge cases ---------------------------------------------------------------------------------------


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
def test_extra_middle_dims_are_positions(device):
    g, x = torch.randn(2, 3, 4, 5, device=device), torch.randn(2, 3, 4, 6, device=device)
    out = torch.zeros(5, 6, device=device)
    ops.accumulate_linear_sq_grad(out, g, x)
    assert_close(out.cpu(), oracle_linear(g.cpu(), x.cpu()), rtol=1e-4, atol=1e-5)


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
    gen = torch.Generator().manual_seed(11)
    for trial in range(25):
        B, T, O, I = (int(v) for v in torch.randint(1, 40, (4,), generator=gen))
        dtype = DTYPES[trial % 3]
        g = torch.randn(B, T, O, generator=gen).to(dtype)
        x = torch.randn(B, T, I, generator=gen).to(dtype)
        out, ref = torch.zeros(O, I), torch.zeros(O, I)
        ops.accumulate_linear_sq_grad(out, g, x)
        ops.accumulate_linear_sq_grad_ref(ref, g, x)
        assert_close(out, ref, rtol=2e-5, atol=1e-5)
        V = int(torch.randint(1, 50, (1,), generator=gen))
        idx = torch.randint(0, V, (B, T), generator=gen)
        oe, re_ = torch.zeros(V, O), torch.zeros(V, O)
        ops.accumulate_embedding_sq_grad(oe, g, idx, trial % V - 1)
        ops.accumulate_embedding_sq_grad_ref(re_, g, idx, trial % V - 1)
        assert_close(oe, re_, rtol=2e-5, atol=1e-5)


# -- torch.library conformance -------------------------------------------------------------------


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


def test_info_reports_a_backend_for_every_op():
    from fastsel.info import format_info, info

    data = info()
    assert set(data["ops"]) == set(ops.OPS)
    for op, per_dev in data["ops"].items():
        assert per_dev["cpu"]["backend"] == ("cpu" if EXTENSION.loaded else "reference")
    assert "extension fastsel._C" in format_info(data)


def test_reference_backend_can_be_forced(monkeypatch):
    import fastsel._backend as backend

    monkeypatch.setattr(backend, "EXTENSION", backend.ExtensionStatus(False, False, "forced in a test"))
    assert backend.op_backend("accumulate_linear_sq_grad", "cpu") == ("reference", "forced in a test")
