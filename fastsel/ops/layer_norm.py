"""The LayerNorm op: the per-example squared gradients of a LayerNorm's weight and bias from its input and output
gradient in one call, x_hat made inside and never stored (the scale/bias op needs x_hat as a tensor and one call per
parameter)."""
from __future__ import annotations

import torch
from torch import Tensor

from fastsel.ops.backend import EXTENSION
from fastsel.ops.common import as_btf, check_out, use_kernel

__all__ = ["accumulate_layer_norm_sq_grad", "accumulate_layer_norm_sq_grad_ref"]


def accumulate_layer_norm_sq_grad(weight_out: Tensor | None, bias_out: Tensor | None, grad_output: Tensor, input: Tensor,
                                  eps: float) -> None:
    """Add the per-example squared gradients of y = weight * x_hat + bias, x_hat = LayerNorm(input) over the last dim.

    weight_out, bias_out (D,) float32, updated in place (either may be None, not both); grad_output (B, *, D) = dL_b/dy;
    input (B, *, D), the LayerNorm's input; eps as the module's. Example b adds (sum_t grad_output * x_hat)^2 to
    weight_out and (sum_t grad_output)^2 to bias_out, x_hat = (input - mean) / sqrt(var + eps) per position (biased
    variance, as the forward).
    """
    if use_kernel("accumulate_layer_norm_sq_grad", grad_output.device):
        torch.ops.fastsel.accumulate_layer_norm_sq_grad(weight_out, bias_out, grad_output, input, float(eps))
    else:
        accumulate_layer_norm_sq_grad_ref(weight_out, bias_out, grad_output, input, eps)


def accumulate_layer_norm_sq_grad_ref(weight_out: Tensor | None, bias_out: Tensor | None, grad_output: Tensor,
                                      input: Tensor, eps: float) -> None:
    """Pure-torch twin of :func:`accumulate_layer_norm_sq_grad` (x_hat from the row mean and variance, in fp32)."""
    if weight_out is None and bias_out is None:
        raise ValueError("fastsel: layer_norm_sq_grad wants weight_out, bias_out or both, got neither")
    if input.shape != grad_output.shape:
        raise ValueError(f"fastsel: input {tuple(input.shape)} and grad_output {tuple(grad_output.shape)} must have the same shape")
    if eps < 0:
        raise ValueError(f"fastsel: layer_norm_sq_grad wants eps >= 0, got {eps}")
    g, x = as_btf(grad_output), as_btf(input)
    for out in (weight_out, bias_out):
        if out is not None:
            check_out(out, (g.shape[-1],), grad_output)
    if g.numel() == 0:  # no example, position or feature: nothing to add
        return
    if weight_out is not None:
        var, mean = torch.var_mean(x, -1, correction=0, keepdim=True)
        weight_out.add_((g * ((x - mean) * torch.rsqrt(var + eps))).sum(1).square().sum(0))
    if bias_out is not None:
        bias_out.add_(g.sum(1).square().sum(0))


if EXTENSION.loaded:  # fake (meta) kernel: the op runs under torch.compile / FakeTensor

    @torch.library.register_fake("fastsel::accumulate_layer_norm_sq_grad")
    def _(weight_out: Tensor | None, bias_out: Tensor | None, grad_output: Tensor, input: Tensor, eps: float) -> None:
        torch._check(weight_out is not None or bias_out is not None, lambda: "weight_out or bias_out must be given")
        torch._check(input.shape == grad_output.shape, lambda: "input and grad_output must have the same shape")
