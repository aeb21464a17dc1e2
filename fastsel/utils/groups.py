"""Groups of examples within a batch (the ranking confidence's K groups, :mod:`fastsel.scores.confidence`): the
``group`` entry of a batch, and which rows of a batch each group holds, as slices when the batch is sorted by group
(views, no copies) and without a device sync when the group ids are on the CPU.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

__all__ = ["Rows", "group_rows", "take_rows", "num_rows", "sort_by_group", "with_groups"]

# The rows of one group in a batch: a slice (the batch is sorted by group) or (n,) int64 indices.
Rows = Tensor | slice


def take_rows(t: Tensor, rows: Rows | None) -> Tensor:
    """t (B, ...) -> its rows (n, ...): t itself for None (all), a view for a slice, else a copy."""
    if rows is None:
        return t
    if isinstance(rows, slice):
        return t[rows]
    return t.index_select(0, rows)


def num_rows(rows: Rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else int(rows.numel())


def group_rows(groups: Tensor, k: int, device: torch.device | str | None = None) -> list[tuple[int, Rows]]:
    """groups (B,) int in 0..K-1 -> [(group g, its rows)] for each group present, in group order.

    Rows are slices when ``groups`` is sorted, else (n_g,) indices on ``device`` (default: the groups' device).
    The ids are read on the CPU: free for CPU ids (the streamed pass keeps the example index there), one sync
    otherwise. Raises a one-line ValueError for an id outside 0..K-1.
    """
    host = groups.detach().reshape(-1).to("cpu", torch.int64)
    if host.numel() and (int(host.min()) < 0 or int(host.max()) >= k):
        raise ValueError(f"fastsel: groups must give every example a group in 0..{k - 1}")
    counts = torch.bincount(host, minlength=k).tolist()
    out: list[tuple[int, Rows]] = []
    if bool((host[1:] >= host[:-1]).all()):
        start = 0
        for g, c in enumerate(counts):
            if c:
                out.append((g, slice(start, start + c)))
            start += c
        return out
    target = groups.device if device is None else device
    return [(g, (host == g).nonzero().flatten().to(target)) for g, c in enumerate(counts) if c]


def sort_by_group(batch: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """The batch's rows reordered so that the groups (``group`` when the batch has it, else ``index`` mod K) are
    contiguous (stable within a group).

    Every entry must have the batch as its first dimension. The sums a pass accumulates do not depend on the order
    of the examples in a batch (up to float rounding), and sorted groups are split by views instead of copies.
    """
    groups = batch["group"] if "group" in batch else batch["index"] % k
    if bool((groups[1:] >= groups[:-1]).all()):
        return dict(batch)
    order = torch.sort(groups, stable=True).indices
    return {name: t.index_select(0, order.to(t.device)) for name, t in batch.items()}


def with_groups(batch: Mapping[str, Tensor], k: int, batch_group: int | None) -> dict[str, Tensor]:
    """The batch with ``group`` (B,) int64 on the host: ``batch_group`` for every row (groups of whole batches),
    or None: each example's ``index`` mod K, the rows sorted by group (:func:`sort_by_group`)."""
    index = batch["index"]
    if batch_group is not None:
        if not 0 <= batch_group < k:
            raise ValueError(f"fastsel: batch group {batch_group} outside 0..{k - 1}")
        return {**batch, "group": torch.full(index.shape, batch_group, dtype=torch.int64)}
    return sort_by_group({**batch, "group": (index % k).to("cpu", torch.int64)}, k)
