"""Helpers shared by the op modules: the (B, T, F) view of an operand and the accumulator check."""
from __future__ import annotations

import torch
from torch import Tensor

from fastsel.ops.backend import op_backend

__all__ = ["as_btf", "check_out", "check_linear_operands", "use_kernel", "REF_CHUNK_ELEMENTS"]

REF_CHUNK_ELEMENTS = 1 << 24  # per-example gradients materialised at once by the references


def use_kernel(op_name: str, device: torch.device) -> bool:
    """Whether the compiled kernel of ``fastsel::op_name`` runs on ``device`` (cached lookup)."""
    return op_backend(op_name, device)[0] != "reference"


def as_btf(t: Tensor) -> Tensor:
    """(B, *, F) -> (B, T, F) float32, the middle dims flattened into T (a 2-d input is T = 1)."""
    if t.dim() < 2:
        raise ValueError(f"fastsel: expected a tensor of shape (B, ..., F), got {tuple(t.shape)}")
    return t.reshape(t.shape[0], t.shape[1:-1].numel(), t.shape[-1]).float()


def check_out(out: Tensor, shape: tuple[int, ...], ref: Tensor) -> None:
    """``out`` must be a contiguous float32 accumulator of ``shape`` on ``ref``'s device."""
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"fastsel: out (the accumulator) must be contiguous float32, got {out.dtype}")
    if tuple(out.shape) != shape:
        raise ValueError(f"fastsel: out must have shape {shape}, got {tuple(out.shape)}")
    if out.device != ref.device:
        raise ValueError(f"fastsel: out is on {out.device} but grad_output is on {ref.device}")


def check_linear_operands(grad_output: Tensor, input: Tensor) -> None:
    """grad_output (B, ..., O) and input (B, ..., I) must agree in every dim but the last."""
    if grad_output.dim() != input.dim() or grad_output.shape[:-1] != input.shape[:-1] or grad_output.dim() < 2:
        raise ValueError(
            f"fastsel: linear_sq_grad wants grad_output (B, ..., O) and input (B, ..., I) with equal leading "
            f"dims, got {tuple(grad_output.shape)} and {tuple(input.shape)}"
        )
