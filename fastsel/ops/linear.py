"""The linear op: out (O, I) += sum_b (grad_output[b]^T @ input[b])^2, the per-example squared weight gradients.

Backends (``fastsel.ops.backend``): the compiled kernel (CPU; on CUDA the pipelined mma.sync kernel or the
64x64 WMMA one), per-example batched GEMMs (:func:`accumulate_linear_sq_grad_bmm`), the Triton kernel
(``fastsel.ops.linear_triton``, imported on first use), the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastsel.ops.backend import EXTENSION, choose_linear_backend
from fastsel.ops.common import REF_CHUNK_ELEMENTS, as_btf, check_linear_operands, check_out

__all__ = [
    "accumulate_linear_sq_grad", "accumulate_linear_sq_grad_bmm", "accumulate_linear_sq_grad_ref", "BMM_WORKSPACE_BYTES",
]

BMM_WORKSPACE_BYTES = 256 << 20  # fp32 per-example products the bmm backend holds at once
# Kernel variant numbers of the schema (csrc/sq_grad.cpp): the compiled backends of the linear op.
_LINEAR_VARIANTS = {"kernel": 0, "wmma": 1, "pipelined": 2}


def accumulate_linear_sq_grad(out: Tensor, grad_output: Tensor, input: Tensor, *, backend: str | None = None) -> None:
    """Add the per-example squared weight gradients of a linear layer y = x W^T + b into ``out``.

    out (O, I) float32, updated in place; grad_output (B, *, O) = dL_b/dy; input (B, *, I) = x.
    The per-example gradient of W for example b is grad_output[b]^T @ input[b] (summed over positions).
    ``backend``: 'kernel', 'wmma', 'pipelined' (CUDA), 'triton', 'bmm' or 'reference'; None picks as
    ``fastsel.ops.backend`` says (FASTSEL_BACKEND, the measured table, the compiled kernel).
    """
    B, O, I = grad_output.shape[0], grad_output.shape[-1], input.shape[-1]
    T = grad_output[0].numel() // max(O, 1) if grad_output.dim() > 2 and B else 1
    name = choose_linear_backend(out.device, grad_output.dtype, B, T, O, I, backend)
    if name in _LINEAR_VARIANTS:
        torch.ops.fastsel.accumulate_linear_sq_grad(out, grad_output, input, _LINEAR_VARIANTS[name])
    elif name == "bmm":
        accumulate_linear_sq_grad_bmm(out, grad_output, input)
    elif name == "triton":
        from fastsel.ops.linear_triton import accumulate_linear_sq_grad_triton  # imports triton: only when asked

        accumulate_linear_sq_grad_triton(out, grad_output, input)
    else:
        accumulate_linear_sq_grad_ref(out, grad_output, input)


# torch.bmm(..., out_dtype=float32) for half operands (CUDA, torch >= 2.8); else the operands go to fp32.
_HALF_BMM_FP32_OUT = "out_dtype" in (torch.bmm.__doc__ or "") or hasattr(torch.ops.aten.bmm, "dtype")


def _operand_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype both GEMM operands are cast to: a shared fp32/bf16/fp16, the half one of half + fp32, else fp32."""
    native = (torch.float32, torch.bfloat16, torch.float16)
    if a == b and a in native:
        return a
    for h, other in ((a, b), (b, a)):
        if h in (torch.bfloat16, torch.float16) and other == torch.float32:
            return h
    return torch.float32


def accumulate_linear_sq_grad_bmm(out: Tensor, grad_output: Tensor, input: Tensor,
                                  workspace_bytes: int = BMM_WORKSPACE_BYTES) -> None:
    """Batched-GEMM backend of :func:`accumulate_linear_sq_grad`: no custom kernel.

    For chunks of examples, P_b = grad_output[b]^T @ input[b] (chunk, O, I) by one ``torch.bmm`` into an fp32
    workspace of at most ``workspace_bytes`` (half operands stay half with an fp32 output on CUDA, so cuBLAS
    uses the tensor cores), then out += sum_b P_b^2. T == 1 is one GEMM of squares, (g^2)^T (x^2).
    Operand dtypes as the CUDA kernels: half + fp32 is computed in the half type.
    """
    check_linear_operands(grad_output, input)
    dtype = _operand_dtype(grad_output.dtype, input.dtype)
    positions = grad_output.shape[1:-1].numel()  # explicit: reshape cannot infer -1 when B == 0
    g = grad_output.reshape(grad_output.shape[0], positions, grad_output.shape[-1]).to(dtype)  # (B, T, O)
    x = input.reshape(input.shape[0], positions, input.shape[-1]).to(dtype)  # (B, T, I)
    B, T, O = g.shape
    I = x.shape[-1]
    check_out(out, (O, I), grad_output)
    if B == 0 or T == 0 or O == 0 or I == 0:
        return
    if T == 1:  # sum_b (g_b x_b^T)^2 = (g^2)^T x^2: one GEMM
        out.addmm_(g[:, 0].float().square().t(), x[:, 0].float().square())
        return
    half_out = dtype != torch.float32 and out.is_cuda and _HALF_BMM_FP32_OUT  # cuBLAS: half in, fp32 out
    if not half_out and dtype != torch.float32:
        g, x = g.float(), x.float()  # CPU BLAS has no half GEMM with an fp32 output
    chunk = max(1, min(B, workspace_bytes // max(1, 4 * O * I)))
    work = None if half_out else torch.empty(chunk, O, I, dtype=torch.float32, device=out.device)
    for start in range(0, B, chunk):
        n = min(chunk, B - start)
        gt, xc = g[start : start + n].transpose(1, 2), x[start : start + n]
        prod = torch.bmm(gt, xc, out_dtype=torch.float32) if half_out else torch.bmm(gt, xc, out=work[:n])
        out.add_(prod.square_().sum(0))


def accumulate_linear_sq_grad_ref(out: Tensor, grad_output: Tensor, input: Tensor) -> None:
    """Pure-torch twin of :func:`accumulate_linear_sq_grad`: materialises per-example gradients in chunks."""
    check_linear_operands(grad_output, input)
    g, x = as_btf(grad_output), as_btf(input)
    check_out(out, (g.shape[-1], x.shape[-1]), grad_output)
    chunk = max(1, REF_CHUNK_ELEMENTS // max(1, g.shape[-1] * x.shape[-1]))
    for start in range(0, g.shape[0], chunk):
        per_example = torch.bmm(g[start : start + chunk].transpose(1, 2), x[start : start + chunk])
        out.add_(per_example.square().sum(0))


if EXTENSION.loaded:  # fake (meta) kernel: the op runs under torch.compile / FakeTensor

    @torch.library.register_fake("fastsel::accumulate_linear_sq_grad")
    def _(out: Tensor, grad_output: Tensor, input: Tensor, variant: int = 0) -> None:
        torch._check(out.dim() == 2, lambda: "out must be (O, I)")
