"""The Triton backend of the linear op (fastsel.ops.linear_triton) against the float64 per-example oracle.

On CPU it runs in Triton's interpreter (TRITON_INTERPRET=1, set by the autouse fixture for each test of this
module only, so that the other op tests do not pick the backend up on CPU). The interpreter is slow: small
shapes, and 16 x 16 x 16 tiles so that small shapes still span several tiles and k-steps.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from oracles import oracle_linear
from torch.testing import assert_close

from fastsel import ops
from fastsel.ops import backend

if backend.triton_status()[0] is None:
    # The test extra installs triton on Linux x86_64, so CI runs these tests: there a missing triton is an error.
    if os.environ.get("CI") and sys.platform == "linux" and platform.machine() == "x86_64":
        raise RuntimeError(f"CI must test the triton backend, and {backend.triton_status()[1]} (pip install -e '.[test]')")
    pytest.skip(f"the triton backend needs triton: {backend.triton_status()[1]}", allow_module_level=True)

from fastsel.ops import linear_triton  # after the skip: needs triton for the kernel
from fastsel.ops.linear_triton import TritonConfig, accumulate_linear_sq_grad_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = TritonConfig(16, 16, 16, 4, 1)  # tl.dot wants each dim >= 16
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton's interpreter where there is no GPU (TRITON_INTERPRET is read at each launch)."""
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def oracle_bias(g: torch.Tensor) -> torch.Tensor:
    """sum_b (sum_t g_b)^2 in float64, one example at a time."""
    g = g.double().reshape(g.shape[0], -1, g.shape[-1])
    return sum(g[b].sum(0).square() for b in range(g.shape[0])).float()


def make(shape: tuple[int, int, int, int], g_dtype: torch.dtype, x_dtype: torch.dtype | None = None, seed: int = 0):
    B, T, O, I = shape
    gen = torch.Generator().manual_seed(seed + sum(shape))
    g = torch.randn(B, T, O, generator=gen).to(DEVICE, g_dtype)
    x = torch.randn(B, T, I, generator=gen).to(DEVICE, x_dtype or g_dtype)
    return g, x


def run(g: torch.Tensor, x: torch.Tensor, *, bias: bool = True, start: float = 0.5, **kwargs):
    """The backend's (weight, bias) accumulators, started at ``start`` (the op adds to what is there)."""
    O, I = g.shape[-1], x.shape[-1]
    out = torch.full((O, I), start, device=g.device)
    bias_out = torch.full((O,), start, device=g.device) if bias else None
    accumulate_linear_sq_grad_triton(out, g, x, bias_out, config=kwargs.pop("config", SMALL), **kwargs)
    return out.cpu(), None if bias_out is None else bias_out.cpu()


# (B, T, O, I): T ragged against BLOCK_T = 16 (one and three k-steps), O and I not multiples of the tile
SHAPES = [(3, 5, 20, 18), (2, 37, 17, 33), (4, 16, 16, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_the_float64_oracle(dtype, shape):
    g, x = make(shape, dtype)
    out, bias_out = run(g, x)
    assert_close(out, oracle_linear(g.cpu(), x.cpu()) + 0.5, **TOL)
    assert_close(bias_out, oracle_bias(g.cpu()) + 0.5, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("splits", [None, 3])
def test_one_position_per_example_is_one_gemm_of_squares(dtype, splits):
    """T = 1 takes the SQUARED form of the kernel: (g^2)^T (x^2) over the B rows, split by k-steps."""
    g, x = make((37, 1, 20, 18), dtype)
    out, bias_out = run(g, x, splits=splits)
    assert_close(out, oracle_linear(g.cpu(), x.cpu()) + 0.5, **TOL)
    assert_close(bias_out, oracle_bias(g.cpu()) + 0.5, **TOL)


@pytest.mark.parametrize("splits", [2, 3, 6])
def test_example_splits_give_the_same_sums(splits):
    """Programs split the examples (atomics into the tile); 6 splits of 4 examples leave programs empty."""
    g, x = make((4, 20, 18, 20), torch.float32)
    whole, whole_bias = run(g, x, splits=1)
    split, split_bias = run(g, x, splits=splits)
    assert_close(split, whole, **TOL)
    assert_close(split_bias, whole_bias, **TOL)
    assert_close(split, oracle_linear(g.cpu(), x.cpu()) + 0.5, **TOL)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_operands_are_computed_in_the_half_type(half):
    """Under autocast a linear's input can be fp32 (a LayerNorm output) while its grad_output is half, or the
    other way round: as the CUDA kernels and the bmm backend, the fp32 operand is rounded to the half type."""
    g, x = make((3, 9, 20, 18), half, torch.float32)
    out, bias_out = run(g, x)
    assert_close(out, oracle_linear(g.cpu(), x.to(half).cpu()) + 0.5, **TOL)
    assert_close(bias_out, oracle_bias(g.cpu()) + 0.5, **TOL)
    x_half, g_fp32 = x.to(half), g.float()
    out, _ = run(g_fp32, x_half, bias=False)
    assert_close(out, oracle_linear(g_fp32.to(half).cpu(), x_half.cpu()) + 0.5, **TOL)


def test_mixed_operands_with_one_position_square_the_half_rounded_values():
    g, x = make((19, 1, 20, 18), torch.float16, torch.float32)  # fp16: rounded in the kernel, even interpreted
    out, _ = run(g, x, bias=False)
    assert_close(out, oracle_linear(g.cpu(), x.to(torch.float16).cpu()) + 0.5, **TOL)


def test_two_different_half_types_are_computed_in_fp32():
    g, _ = make((2, 7, 17, 18), torch.bfloat16)
    _, x = make((2, 7, 17, 18), torch.float16)
    out, _ = run(g, x, bias=False)
    assert_close(out, oracle_linear(g.cpu(), x.cpu()) + 0.5, **TOL)


def test_non_contiguous_operands():
    """Strides go to the kernel: transposed and sliced operands need no copy."""
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(3, 20, 11, generator=gen).to(DEVICE).transpose(1, 2)  # (3, 11, 20), O stride 11
    x = torch.randn(3, 11, 40, generator=gen).to(DEVICE)[:, :, ::2]  # (3, 11, 20), I stride 2
    assert not g.is_contiguous() and not x.is_contiguous()
    out, bias_out = run(g, x)
    assert_close(out, oracle_linear(g.cpu(), x.cpu()) + 0.5, **TOL)
    assert_close(bias_out, oracle_bias(g.cpu()) + 0.5, **TOL)


def test_extra_middle_dims_are_positions_even_when_they_do_not_flatten():
    """(B, 2, 3, F) with permuted middle dims: the reshape to (B, T, F) copies, the sums are the same."""
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(2, 3, 2, 17, generator=gen).to(DEVICE).transpose(1, 2)  # (2, 2, 3, 17)
    x = torch.randn(2, 3, 2, 18, generator=gen).to(DEVICE).transpose(1, 2)
    out, bias_out = run(g, x)
    assert_close(out, oracle_linear(g.cpu(), x.cpu()) + 0.5, **TOL)
    assert_close(bias_out, oracle_bias(g.cpu()) + 0.5, **TOL)


def test_through_the_op_and_the_environment(monkeypatch):
    """backend='triton' and FASTSEL_BACKEND=triton reach the kernel (its default configuration)."""
    g, x = make((3, 6, 20, 18), torch.float32)
    out = torch.zeros(20, 18, device=DEVICE)
    ops.accumulate_linear_sq_grad(out, g, x, backend="triton")
    assert_close(out.cpu(), oracle_linear(g.cpu(), x.cpu()), **TOL)
    monkeypatch.setenv(backend.BACKEND_ENV, "accumulate_linear_sq_grad=triton")
    assert backend.choose_linear_backend(torch.device(DEVICE), torch.float32, 3, 6, 20, 18) == "triton"
    ops.accumulate_linear_sq_grad(out, g, x)
    assert_close(out.cpu(), 2 * oracle_linear(g.cpu(), x.cpu()), **TOL)


def test_empty_inputs_change_nothing():
    out, bias_out = torch.ones(3, 4, device=DEVICE), torch.ones(3, device=DEVICE)
    accumulate_linear_sq_grad_triton(out, torch.randn(0, 5, 3, device=DEVICE), torch.randn(0, 5, 4, device=DEVICE), bias_out)
    accumulate_linear_sq_grad_triton(out, torch.randn(2, 0, 3, device=DEVICE), torch.randn(2, 0, 4, device=DEVICE), bias_out)
    assert out.eq(1).all() and bias_out.eq(1).all()


def test_no_input_features_still_gives_the_bias():
    g = torch.randn(2, 5, 3, device=DEVICE)
    out, bias_out = run(g, torch.randn(2, 5, 0, device=DEVICE))
    assert out.shape == (3, 0)
    assert_close(bias_out, oracle_bias(g.cpu()) + 0.5, **TOL)


def test_bad_inputs_are_rejected():
    g, x = torch.randn(2, 5, 3, device=DEVICE), torch.randn(2, 5, 4, device=DEVICE)
    with pytest.raises(ValueError, match="equal leading"):
        accumulate_linear_sq_grad_triton(torch.zeros(3, 4, device=DEVICE), g, x[:1])
    with pytest.raises(ValueError, match="out must"):
        accumulate_linear_sq_grad_triton(torch.zeros(4, 4, device=DEVICE), g, x)
    with pytest.raises(ValueError, match=r"out must have shape \(3,\)"):
        accumulate_linear_sq_grad_triton(torch.zeros(3, 4, device=DEVICE), g, x, torch.zeros(4, device=DEVICE))


def test_never_the_default_and_unavailable_on_cpu_without_the_interpreter(monkeypatch):
    device = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.choose_linear_backend(device, torch.bfloat16, 32, 128, 768, 768) != "triton"
    assert "triton" in backend.linear_backends_available(device)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in backend.linear_backends_available(device)
    assert backend.choose_linear_backend(device, torch.float32, 2, 3, 4, 5, "bmm") == "bmm"
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.accumulate_linear_sq_grad(torch.zeros(4, 5), torch.randn(2, 3, 4), torch.randn(2, 3, 5), backend="triton")


def test_example_split_rule():
    # enough tiles for every SM: no split; one tile on many SMs: the examples are spread
    assert linear_triton.choose_example_splits(32, 8, 10000, 132) == 1
    assert linear_triton.choose_example_splits(32, 8, 1, 132) == 32
    assert 1 < linear_triton.choose_example_splits(64, 8, 16, 132) <= 64
    assert linear_triton.choose_example_splits(1, 8, 1, 132) == 1


def test_configurations_and_shape_classes():
    for capability in [(9, 0), (8, 0), (8, 9), (7, 5)]:
        configs = linear_triton.configs_for_capability(capability)
        assert configs
        for c in configs:  # two fp32 tiles of O x I must fit the registers: 128 x 128 wants 8 warps
            assert c.block_o * c.block_i // (32 * c.num_warps) <= 64, c
            assert min(c.block_o, c.block_i, c.block_t) >= 16, c
    codes = {linear_triton.shape_class_code(B, T, 64, OI) for B in (4, 16, 64) for T in (1, 20, 100, 300)
             for OI in (64, 1 << 16)}
    assert len(codes) == 4 * 3 * 2


def test_info_lists_the_triton_backend(monkeypatch):
    from fastsel.cli.info import format_info, info

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    data = info()
    assert data["triton"]["version"] == backend.triton_status()[0]
    assert data["triton"]["devices"]["cpu"]["available"] is True  # in the interpreter
    assert "triton" in data["linear_backends"]["cpu"]
    assert "triton" in format_info(data)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in info()["triton"]["devices"]["cpu"]["reason"]


def test_fastsel_imports_and_works_without_triton(tmp_path):
    """With triton unimportable, fastsel imports, the linear op runs, and the backend says why it cannot."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # import triton -> ImportError
        "import torch, fastsel\n"
        "from fastsel import ops\n"
        "from fastsel.ops import backend, linear_triton\n"
        "from fastsel.cli.info import info, format_info\n"
        "assert linear_triton.TRITON_IMPORT_ERROR\n"
        "ok, why = backend.triton_backend_status('cpu')\n"
        "assert not ok and 'triton not importable' in why, why\n"
        "assert 'triton' not in backend.linear_backends_available('cpu')\n"
        "out = torch.zeros(4, 5); ops.accumulate_linear_sq_grad(out, torch.randn(2, 3, 4), torch.randn(2, 3, 5))\n"
        "assert out.gt(0).all()\n"
        "try:\n"
        "    ops.accumulate_linear_sq_grad(out, torch.randn(2, 3, 4), torch.randn(2, 3, 5), backend='triton')\n"
        "except ValueError as exc:\n"
        "    assert 'triton not importable' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "assert 'triton not importable' in format_info(info())\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop(backend.BACKEND_ENV, None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("capability,g_dtype,x_dtype,config,squared,instruction", [
    ((9, 0), torch.bfloat16, torch.bfloat16, TritonConfig(128, 128, 32, 8, 4), False, "wgmma.mma_async"),
    ((9, 0), torch.bfloat16, torch.float32, TritonConfig(128, 64, 32, 4, 4), False, "wgmma.mma_async"),
    ((8, 0), torch.float16, torch.float16, TritonConfig(128, 128, 32, 8, 3), False, "mma.sync"),
    ((9, 0), torch.float32, torch.float32, TritonConfig(64, 64, 32, 4, 3), True, "fma.rn.f32"),
], ids=["sm90-bf16", "sm90-bf16+fp32", "sm80-fp16", "sm90-fp32-T1"])
def test_the_kernel_compiles_for_the_gpus(capability, g_dtype, x_dtype, config, squared, instruction):
    """What the interpreter cannot show: the kernel goes through Triton's GPU compiler and ptxas (no GPU needed),
    on the tensor cores, with the loads pipelined by cp.async across the example boundaries."""
    compiled = linear_triton.compile_for_target(capability, g_dtype, x_dtype, config, squared=squared)
    ptx = compiled.asm["ptx"]
    assert instruction in ptx
    assert "cp.async" in ptx


def test_the_autotuned_launch_restores_the_accumulators(monkeypatch):
    """The autotuner runs every configuration on the real out and bias: they must be restored between trials
    (else the sums count once per configuration). Timed here by the wall clock (Triton's default needs CUDA)."""
    import time

    def wall_clock(fn, quantiles):
        start = time.perf_counter()
        fn()
        return [time.perf_counter() - start] * len(quantiles)

    configs = [SMALL, TritonConfig(32, 32, 16, 4, 1), TritonConfig(64, 64, 64, 4, 1)]  # the last: pruned (T = 9)
    tuner = linear_triton.make_autotuner(configs, linear_triton._plain_kernel(DEVICE == "cpu"), do_bench=wall_clock)
    monkeypatch.setattr(linear_triton, "_autotuned", lambda capability: tuner)
    g, x = make((3, 9, 20, 18), torch.float32)
    out, bias_out = run(g, x, config=None, autotune=True)
    assert_close(out, oracle_linear(g.cpu(), x.cpu()) + 0.5, **TOL)
    assert_close(bias_out, oracle_bias(g.cpu()) + 0.5, **TOL)
    assert len(tuner.configs_timings) == 2 and tuner.best_config.kwargs["BLOCK_T"] == 16
