"""The scale/bias op: out (D,) += sum_b (sum_t grad_output[b, t] * input[b, t])^2 (LayerNorm/RMSNorm weights, biases)."""
from __future__ import annotations

import torch
from torch import Tensor

from fastsel.ops.backend import EXTENSION
from fastsel.ops.common import as_btf, check_out, use_kernel

__all__ = ["accumulate_norm_sq_grad", "accumulate_norm_sq_grad_ref"]


def accumulate_norm_sq_grad(out: Tensor, grad_output: Tensor, input: Tensor | None = None) -> None:
    """Add per-example squared gradients of an elementwise scale (or, with ``input=None``, a bias).

    out (D,) float32, updated in place; grad_output (B, *, D); input (B, *, D) or None.
    The per-example gradient of a scale gamma in y = gamma * input (+ beta) is sum_t grad_output * input;
    of a bias beta it is sum_t grad_output.
    """
    if use_kernel("accumulate_norm_sq_grad", out.device):
        torch.ops.fastsel.accumulate_norm_sq_grad(out, grad_output, input)
    else:
        accumulate_norm_sq_grad_ref(out, grad_output, input)


def accumulate_norm_sq_grad_ref(out: Tensor, grad_output: Tensor, input: Tensor | None = None) -> None:
    """Pure-torch twin of :func:`accumulate_norm_sq_grad`."""
    g = as_btf(grad_output)
    if input is not None:
        if input.shape != grad_output.shape:
            raise ValueError(
                f"fastsel: input {tuple(input.shape)} and grad_output {tuple(grad_output.shape)} must have the same shape"
            )
        g = g * as_btf(input)
    check_out(out, (g.shape[-1],), grad_output)
    out.add_(g.sum(1).square().sum(0))


if EXTENSION.loaded:  # fake (meta) kernel: the op runs under torch.compile / FakeTensor

    @torch.library.register_fake("fastsel::accumulate_norm_sq_grad")
    def _(out: Tensor, grad_output: Tensor, input: Tensor | None) -> None:
        torch._check(out.dim() == 1, lambda: "out must be (D,)")
