"""Streaming per-class statistics of pooled hidden states (the variability ratio, fastsel.scores.variability)."""
from __future__ import annotations

import torch
from torch import Tensor

from fastsel.ops.backend import EXTENSION
from fastsel.ops.common import use_kernel

__all__ = ["ClassGrouping", "class_grouping", "class_stats_update", "class_stats_update_ref", "class_stats_pool",
           "class_stats_pool_ref"]

# The examples of a batch grouped by class: (order (B,) int64, offsets (C + 1,) int64), class c's examples being
# order[offsets[c]:offsets[c + 1]].
ClassGrouping = tuple[Tensor, Tensor]


def class_grouping(labels: Tensor, num_classes: int) -> ClassGrouping:
    """labels (B,) int64 -> (order (B,), offsets (C + 1,)), on the labels' device without a host sync: computed once per
    batch and passed to :func:`class_stats_update` of every layer (the CUDA kernel then skips its own grouping).
    Labels outside [0, C) fall outside every class range (the op rejects them)."""
    order = torch.sort(labels, stable=True).indices
    offsets = torch.searchsorted(labels.index_select(0, order),
                                 torch.arange(num_classes + 1, dtype=labels.dtype, device=labels.device))
    return order, offsets.to(torch.int64)


def class_stats_update(count: Tensor, mean: Tensor, m2: Tensor, hidden: Tensor, pool_mask: Tensor, labels: Tensor,
                       grouping: ClassGrouping | None = None) -> None:
    """Pool ``hidden`` per example and merge each class's batch statistics into the running ones, in place.

    count (C,) float64; mean (C, D) and m2 (C, D, D) float64 or float32 (same dtype); hidden (B, T, D)
    any float dtype; pool_mask (B, T) (nonzero = pooled token); labels (B,) int64 in [0, C).
    L layers of one batch in one call: count (L, C), mean (L, C, D), m2 (L, C, D, D), hidden (L, B, T, D), each
    layer updated as alone (already pooled states: hidden (L, B, 1, D) with pool_mask (B, 1), see
    :func:`class_stats_pool`).
    Example b's state is the mean of hidden[b, t] over its pooled tokens; examples with no pooled token
    are skipped. For each class the batch's (count n_b, mean, centred scatter S_b) is merged with
    Chan's formula: n = n_a + n_b, mean += delta n_b / n, m2 += S_b + delta delta^T n_a n_b / n.
    grouping: :func:`class_grouping` of these labels (optional: the same results; it saves the kernel's own grouping
    when one batch updates many layers).
    """
    order, offsets = grouping if grouping is not None else (None, None)
    if use_kernel("class_stats_update", hidden.device):
        torch.ops.fastsel.class_stats_update(count, mean, m2, hidden, pool_mask, labels, order, offsets)
    else:
        class_stats_update_ref(count, mean, m2, hidden, pool_mask, labels, grouping)


def class_stats_pool(pooled: Tensor, hidden: Tensor, pool_mask: Tensor) -> None:
    """pooled (B, D) float32 or float64, written in place: hidden (B, T, D) (any float dtype) averaged over each
    example's pooled tokens (pool_mask (B, T) nonzero), summed in pooled's dtype; 0 for an example without one.
    The pooling stage of :func:`class_stats_update` alone, so that a batch's layers, pooled as the forward makes
    them, are merged by one update of (L, B, 1, D) without holding their hidden states."""
    if use_kernel("class_stats_pool", hidden.device):
        torch.ops.fastsel.class_stats_pool(pooled, hidden, pool_mask)
    else:
        class_stats_pool_ref(pooled, hidden, pool_mask)


def class_stats_pool_ref(pooled: Tensor, hidden: Tensor, pool_mask: Tensor) -> None:
    """Pure-torch twin of :func:`class_stats_pool`."""
    if not hidden.is_floating_point() or hidden.dim() != 3:
        raise ValueError(f"fastsel: hidden must be a floating (B, T, D) tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    B, T, D = hidden.shape
    if tuple(pool_mask.shape) != (B, T):
        raise ValueError(f"fastsel: pool_mask must be (B, T) = {(B, T)}, got {tuple(pool_mask.shape)}")
    if pooled.dtype not in (torch.float32, torch.float64) or tuple(pooled.shape) != (B, D) or not pooled.is_contiguous():
        raise ValueError(f"fastsel: pooled must be a contiguous float32 or float64 (B, D) = {(B, D)} tensor, got "
                         f"{pooled.dtype} {tuple(pooled.shape)}")
    for t in (pooled, pool_mask):
        if t.device != hidden.device:
            raise ValueError(f"fastsel: all tensors must be on {hidden.device}, got one on {t.device}")
    w = (pool_mask != 0).to(pooled.dtype)  # (B, T)
    ntok = w.sum(1)
    torch.bmm(w.unsqueeze(1), hidden.to(pooled.dtype), out=pooled.view(B, 1, D))
    pooled.div_(ntok.clamp(min=1).unsqueeze(1))


def _check_class_stats(count: Tensor, mean: Tensor, m2: Tensor, hidden: Tensor, pool_mask: Tensor, labels: Tensor,
                       grouping: ClassGrouping | None = None) -> None:
    """One layer's arguments (the layers of a call are checked one by one)."""
    if not hidden.is_floating_point() or hidden.dim() != 3:
        raise ValueError(f"fastsel: hidden must be a floating (B, T, D) tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    B, T, D = hidden.shape
    if tuple(pool_mask.shape) != (B, T):
        raise ValueError(f"fastsel: pool_mask must be (B, T) = {(B, T)}, got {tuple(pool_mask.shape)}")
    if labels.dtype != torch.int64 or tuple(labels.shape) != (B,):
        raise ValueError(f"fastsel: labels must be int64 (B,) = ({B},), got {labels.dtype} {tuple(labels.shape)}")
    if count.dtype != torch.float64 or count.dim() != 1 or count.shape[0] < 1:
        raise ValueError(f"fastsel: count must be float64 (C,), got {count.dtype} {tuple(count.shape)}")
    C = count.shape[0]
    if mean.dtype not in (torch.float32, torch.float64) or m2.dtype != mean.dtype:
        raise ValueError(f"fastsel: mean and m2 must both be float32 or float64, got {mean.dtype} and {m2.dtype}")
    if tuple(mean.shape) != (C, D) or tuple(m2.shape) != (C, D, D):
        raise ValueError(f"fastsel: mean must be (C, D) = {(C, D)} and m2 (C, D, D), got {tuple(mean.shape)}, {tuple(m2.shape)}")
    if not (count.is_contiguous() and mean.is_contiguous() and m2.is_contiguous()):
        raise ValueError("fastsel: the accumulators (count, mean, m2) must be contiguous")
    for t in (count, mean, m2, pool_mask, labels):
        if t.device != hidden.device:
            raise ValueError(f"fastsel: all tensors must be on {hidden.device}, got one on {t.device}")
    if B and (labels.min() < 0 or labels.max() >= C):
        raise ValueError(f"fastsel: labels out of range [0, {C})")
    if grouping is not None:
        order, offsets = grouping
        if order.dtype != torch.int64 or tuple(order.shape) != (B,):
            raise ValueError(f"fastsel: order must be int64 (B,) = ({B},), got {order.dtype} {tuple(order.shape)}")
        if offsets.dtype != torch.int64 or tuple(offsets.shape) != (C + 1,):
            raise ValueError(f"fastsel: offsets must be int64 (C + 1,) = ({C + 1},), got {offsets.dtype} {tuple(offsets.shape)}")


def class_stats_update_ref(count: Tensor, mean: Tensor, m2: Tensor, hidden: Tensor, pool_mask: Tensor, labels: Tensor,
                           grouping: ClassGrouping | None = None) -> None:
    """Pure-torch twin of :func:`class_stats_update` (vectorised over the batch, one-hot over classes; a given
    grouping is checked, not needed; L layers one after another)."""
    if hidden.dim() == 4:
        L, D = hidden.shape[0], hidden.shape[-1]
        C = count.shape[-1] if count.dim() else 0
        for name, t, dims, shape in (("count", count, "(L, C)", (L, C)), ("mean", mean, "(L, C, D)", (L, C, D)),
                                     ("m2", m2, "(L, C, D, D)", (L, C, D, D))):
            if tuple(t.shape) != shape:
                raise ValueError(f"fastsel: {name} must be {dims} = {shape} (hidden is (L, B, T, D)), got "
                                 f"{tuple(t.shape)}")
        for l in range(L):
            class_stats_update_ref(count[l], mean[l], m2[l], hidden[l], pool_mask, labels, grouping)
        return
    _check_class_stats(count, mean, m2, hidden, pool_mask, labels, grouping)
    B, _, D = hidden.shape
    if B == 0:
        return
    acc = mean.dtype
    w = (pool_mask != 0).to(acc)  # (B, T)
    ntok = w.sum(1)  # (B,)
    pooled = torch.bmm(w.unsqueeze(1), hidden.to(acc)).squeeze(1) / ntok.clamp(min=1).unsqueeze(1)  # (B, D)
    onehot = torch.nn.functional.one_hot(labels, count.shape[0]).to(acc) * (ntok > 0).to(acc).unsqueeze(1)  # (B, C)
    nb = onehot.sum(0)  # (C,)
    present = nb > 0
    bmean = (onehot.t() @ pooled) / nb.clamp(min=1).unsqueeze(1)  # (C, D)
    centred = pooled.unsqueeze(0) - bmean.unsqueeze(1)  # (C, B, D)
    weighted = centred * onehot.t().unsqueeze(2)
    scatter = weighted.transpose(1, 2) @ centred  # (C, D, D): S_b = sum_{b in c} x_c x_c^T
    na = count.to(acc)
    n = na + nb
    delta = bmean - mean  # (C, D)
    coef = torch.where(present, na * nb / n.clamp(min=1), torch.zeros_like(n))
    m2.add_(scatter + coef.view(-1, 1, 1) * delta.unsqueeze(2) * delta.unsqueeze(1))
    mean.add_(delta * torch.where(present, nb / n.clamp(min=1), torch.zeros_like(n)).unsqueeze(1))
    count.add_(nb.to(torch.float64))


if EXTENSION.loaded:  # fake (meta) kernels: the ops run under torch.compile / FakeTensor

    @torch.library.register_fake("fastsel::class_stats_update")
    def _(count: Tensor, mean: Tensor, m2: Tensor, hidden: Tensor, pool_mask: Tensor, labels: Tensor,
          order: Tensor | None = None, offsets: Tensor | None = None) -> None:
        torch._check(hidden.dim() in (3, 4), lambda: "hidden must be (B, T, D) or (L, B, T, D)")
        torch._check(m2.dim() == hidden.dim(), lambda: "m2 must be (C, D, D), or (L, C, D, D) with an (L, B, T, D) hidden")

    @torch.library.register_fake("fastsel::class_stats_pool")
    def _(pooled: Tensor, hidden: Tensor, pool_mask: Tensor) -> None:
        torch._check(hidden.dim() == 3, lambda: "hidden must be (B, T, D)")
        torch._check(pooled.dim() == 2, lambda: "pooled must be (B, D)")
