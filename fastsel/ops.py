"""Typed wrappers of the fastsel ops, their fake (meta) kernels, and their pure-torch ``*_ref`` twins.

Each wrapper runs the compiled kernel for the tensor's device when the extension has one, and the
``*_ref`` twin otherwise (see ``fastsel info``). The ``*_ref`` twins are also the test oracles.

Shape conventions: B examples, T positions per example (any number of middle dims is flattened into
T; a 2-d input is T = 1), O/I/D feature sizes, V embedding rows. Accumulators are float32; inputs may be
fp32, bf16 or fp16 and are accumulated in fp32.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastsel._backend import EXTENSION, op_backend

__all__ = [
    "accumulate_linear_sq_grad",
    "accumulate_linear_sq_grad_ref",
    "accumulate_norm_sq_grad",
    "accumulate_norm_sq_grad_ref",
    "accumulate_embedding_sq_grad",
    "accumulate_embedding_sq_grad_ref",
    "OPS",
]

# Every op of the library, for `fastsel info` and the opcheck tests.
OPS: list[str] = ["accumulate_linear_sq_grad", "accumulate_norm_sq_grad", "accumulate_embedding_sq_grad"]

_REF_CHUNK_ELEMENTS = 1 << 24  # per-example gradients materialised at once by the references


def _use_kernel(op_name: str, device: torch.device) -> bool:
    return op_backend(op_name, device)[0] != "reference"


def _btf(t: Tensor) -> Tensor:
    if t.dim() < 2:
        raise ValueError(f"fastsel: expected a tensor of shape (B, ..., F), got {tuple(t.shape)}")
    return t.reshape(t.shape[0], t.shape[1:-1].numel(), t.shape[-1]).float()


def _check_out(out: Tensor, shape: tuple[int, ...], ref: Tensor) -> None:
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"fastsel: out (the accumulator) must be contiguous float32, got {out.dtype}")
    if tuple(out.shape) != shape:
        raise ValueError(f"fastsel: out must have shape {shape}, got {tuple(out.shape)}")
    if out.device != ref.device:
        raise ValueError(f"fastsel: out is on {out.device} but grad_output is on {ref.device}")


# ---------------------------------------------------------------------------------------------------
# Linear: out (O, I) += sum_b (grad_output[b]^T @ input[b])^2
# ---------------------------------------------------------------------------------------------------


def accumulate_linear_sq_grad(out: Tensor, grad_output: Tensor, input: Tensor) -> None:
    """Add the per-example squared weight gradients of a linear layer y = x W^T + b into ``out``.

    out (O, I) float32, updated in place; grad_output (B, *, O) = dL_b/dy; input (B, *, I) = x.
    The per-example gradient of W for example b is grad_output[b]^T @ input[b] (summed over positions).
    """
    if _use_kernel("accumulate_linear_sq_grad", out.device):
        torch.ops.fastsel.accumulate_linear_sq_grad(out, grad_output, input)
    else:
        accumulate_linear_sq_grad_ref(out, grad_output, input)


def accumulate_linear_sq_grad_ref(out: Tensor, grad_output: Tensor, input: Tensor) -> None:
    """Pure-torch twin of :func:`accumulate_linear_sq_grad`: materialises per-example gradients in chunks."""
    if grad_output.dim() != input.dim() or grad_output.shape[:-1] != input.shape[:-1]:
        raise ValueError(
            f"fastsel: linear_sq_grad wants grad_output (B, ..., O) and input (B, ..., I) with equal leading "
            f"dims, got {tuple(grad_output.shape)} and {tuple(input.shape)}"
        )
    g, x = _btf(grad_output), _btf(input)
    _check_out(out, (g.shape[-1], x.shape[-1]), grad_output)
    chunk = max(1, _REF_CHUNK_ELEMENTS // max(1, g.shape[-1] * x.shape[-1]))
    for start in range(0, g.shape[0], chunk):
        per_example = torch.bmm(g[start : start + chunk].transpose(1, 2), x[start : start + chunk])
        out.add_(per_example.square().sum(0))


# ---------------------------------------------------------------------------------------------------
# Scale / bias vectors (LayerNorm weight and bias, Linear bias): out (D,) += sum_b (sum_t g * x)^2
# ---------------------------------------------------------------------------------------------------


def accumulate_norm_sq_grad(out: Tensor, grad_output: Tensor, input: Tensor | None = None) -> None:
    """Add per-example squared gradients of an elementwise scale (or, with ``input=None``, a bias).

    out (D,) float32, updated in place; grad_output (B, *, D); input (B, *, D) or None.
    The per-example gradient of a scale gamma in y = gamma * input (+ beta) is sum_t grad_output * input;
    of a bias beta it is sum_t grad_output.
    """
    if _use_kernel("accumulate_norm_sq_grad", out.device):
        torch.ops.fastsel.accumulate_norm_sq_grad(out, grad_output, input)
    else:
        accumulate_norm_sq_grad_ref(out, grad_output, input)


def accumulate_norm_sq_grad_ref(out: Tensor, grad_output: Tensor, input: Tensor | None = None) -> None:
    """Pure-torch twin of :func:`accumulate_norm_sq_grad`."""
    g = _btf(grad_output)
    if input is not None:
        if input.shape != grad_output.shape:
            raise ValueError(
                f"fastsel: input {tuple(input.shape)} and grad_output {tuple(grad_output.shape)} must have the same shape"
            )
        g = g * _btf(input)
    _check_out(out, (g.shape[-1],), grad_output)
    out.add_(g.sum(1).square().sum(0))


# ---------------------------------------------------------------------------------------------------
# Embedding: out (V, D) += sum_b (sum_{t: idx[b,t] = v} grad_output[b, t])^2
# ---------------------------------------------------------------------------------------------------


def accumulate_embedding_sq_grad(out: Tensor, grad_output: Tensor, indices: Tensor, padding_idx: int = -1) -> None:
    """Add per-example squared gradients of an embedding table into ``out``.

    out (V, D) float32, updated in place; grad_output (B, *, D); indices (B, *) integer.
    A token repeated within one example contributes the square of the sum of its rows. Rows equal to
    ``padding_idx`` (-1: none) are skipped, as nn.Embedding never updates them.
    """
    if _use_kernel("accumulate_embedding_sq_grad", out.device):
        torch.ops.fastsel.accumulate_embedding_sq_grad(out, grad_output, indices, padding_idx)
    else:
        accumulate_embedding_sq_grad_ref(out, grad_output, indices, padding_idx)


def accumulate_embedding_sq_grad_ref(out: Tensor, grad_output: Tensor, indices: Tensor, padding_idx: int = -1) -> None:
    """Pure-torch twin of :func:`accumulate_embedding_sq_grad`: sums rows per (example, token) pair."""
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fastsel: indices must be int64 or int32, got {indices.dtype}")
    if grad_output.dim() != indices.dim() + 1 or grad_output.shape[:-1] != indices.shape:
        raise ValueError(
            f"fastsel: embedding_sq_grad wants indices (B, ...) and grad_output (B, ..., D), got "
            f"{tuple(indices.shape)} and {tuple(grad_output.shape)}"
        )
    g = _btf(grad_output)
    B, T, D = g.shape
    if out.dim() != 2:
        raise ValueError(f"fastsel: out must be (V, D), got {tuple(out.shape)}")
    V = out.shape[0]
    _check_out(out, (V, D), grad_output)
    idx = indices.reshape(B, T).long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= V):
        raise ValueError(f"fastsel: embedding index out of range [0, {V})")
    example = torch.arange(B, device=idx.device).unsqueeze(1).expand(B, T)
    keys, inverse = torch.unique(example * V + idx, return_inverse=True)
    sums = torch.zeros(keys.numel(), D, dtype=torch.float32, device=g.device)
    sums.index_add_(0, inverse.reshape(-1), g.reshape(B * T, D))
    tokens = keys % V
    keep = tokens != padding_idx
    out.index_add_(0, tokens[keep], sums[keep].square())


# ---------------------------------------------------------------------------------------------------
# Fake kernels: let the ops run under torch.compile / FakeTensor (they mutate `out` and return nothing).
# ---------------------------------------------------------------------------------------------------

if EXTENSION.loaded:

    @torch.library.register_fake("fastsel::accumulate_linear_sq_grad")
    def _(out: Tensor, grad_output: Tensor, input: Tensor) -> None:
        torch._check(out.dim() == 2, lambda: "out must be (O, I)")

    @torch.library.register_fake("fastsel::accumulate_norm_sq_grad")
    def _(out: Tensor, grad_output: Tensor, input: Tensor | None) -> None:
        torch._check(out.dim() == 1, lambda: "out must be (D,)")

    @torch.library.register_fake("fastsel::accumulate_embedding_sq_grad")
    def _(out: Tensor, grad_output: Tensor, indices: Tensor, padding_idx: int) -> None:
        torch._check(out.dim() == 2, lambda: "out must be (V, D)")
