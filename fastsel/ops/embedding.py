"""The embedding op: out (V, D) += sum_b (sum_{t: idx[b, t] = v} grad_output[b, t])^2, tokens repeated in an example summed first."""
from __future__ import annotations

import torch
from torch import Tensor

from fastsel.ops.backend import EXTENSION
from fastsel.ops.common import as_btf, check_out, use_kernel

__all__ = ["accumulate_embedding_sq_grad", "accumulate_embedding_sq_grad_ref"]


def accumulate_embedding_sq_grad(out: Tensor, grad_output: Tensor, indices: Tensor, padding_idx: int = -1) -> None:
    """Add per-example squared gradients of an embedding table into ``out``.

    out (V, D) float32, updated in place; grad_output (B, *, D); indices (B, *) integer.
    A token repeated within one example contributes the square of the sum of its rows. Rows equal to
    ``padding_idx`` (-1: none) are skipped, as nn.Embedding never updates them.
    """
    if use_kernel("accumulate_embedding_sq_grad", out.device):
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
    g = as_btf(grad_output)
    B, T, D = g.shape
    if out.dim() != 2:
        raise ValueError(f"fastsel: out must be (V, D), got {tuple(out.shape)}")
    V = out.shape[0]
    check_out(out, (V, D), grad_output)
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


if EXTENSION.loaded:  # fake (meta) kernel: the op runs under torch.compile / FakeTensor

    @torch.library.register_fake("fastsel::accumulate_embedding_sq_grad")
    def _(out: Tensor, grad_output: Tensor, indices: Tensor, padding_idx: int) -> None:
        torch._check(out.dim() == 2, lambda: "out must be (V, D)")
