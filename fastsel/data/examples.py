"""The raw examples of one split (:class:`Examples`: the task, ``text_a``, optional ``text_b`` and the labels,
integer class indices or floats for regression) and their seeded subsampling (:func:`subsample`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fastsel.data.specs import TaskSpec

__all__ = ["Examples", "subsample"]


@dataclass
class Examples:
    """The raw examples of one split."""

    task: TaskSpec
    split: str
    text_a: list[str]
    text_b: list[str] | None  # None for single-sentence tasks
    labels: list[int] | list[float]

    def __post_init__(self) -> None:
        n = len(self.text_a)
        if len(self.labels) != n or (self.text_b is not None and len(self.text_b) != n):
            raise ValueError(
                f"Examples: text_a ({n}), text_b ({None if self.text_b is None else len(self.text_b)})"
                f" and labels ({len(self.labels)}) must have the same length"
            )

    def __len__(self) -> int:
        return len(self.text_a)

    def subset(self, indices: Sequence[int]) -> "Examples":
        idx = [int(i) for i in indices]
        return Examples(
            task=self.task,
            split=self.split,
            text_a=[self.text_a[i] for i in idx],
            text_b=None if self.text_b is None else [self.text_b[i] for i in idx],
            labels=[self.labels[i] for i in idx],
        )


# ----------------------------------------------------------------------------------------------
# Subsampling
# ----------------------------------------------------------------------------------------------


def _balanced_quota(counts: dict[int, int], k: int) -> dict[int, int]:
    """Split ``k`` over classes as equally as possible, capped by each class's size (water filling)."""
    quota = {c: 0 for c in counts}
    remaining = min(k, sum(counts.values()))
    active = sorted(c for c in counts if counts[c] > 0)
    while remaining > 0 and active:
        share = remaining // len(active)
        if share == 0:
            for c in active[:remaining]:
                quota[c] += 1
            break
        for c in active:
            add = min(share, counts[c] - quota[c])
            quota[c] += add
            remaining -= add
        active = [c for c in active if quota[c] < counts[c]]
    return quota


def subsample(ex: Examples, num_examples: int | None, seed: int, balanced: bool) -> Examples:
    """A seeded random subset of ``num_examples`` drawn without replacement (``numpy.random.default_rng(seed)``),
    kept in the original order; ``balanced=True`` draws as equally as possible per class. ``None``, or more
    examples than exist, gives all of them."""
    if num_examples is None:
        if balanced:
            raise ValueError("balanced=True needs num_examples")
        return ex
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    n = len(ex)
    rng = np.random.default_rng(seed)
    if balanced:
        if ex.task.is_regression:
            raise ValueError(f"balanced subsampling needs a classification task; {ex.task.name} is regression")
        labels = np.asarray(ex.labels, dtype=np.int64)
        classes = sorted(set(labels.tolist()))
        counts = {c: int((labels == c).sum()) for c in classes}
        quota = _balanced_quota(counts, num_examples)
        chosen: list[int] = []
        for c in classes:
            idx = np.flatnonzero(labels == c)
            chosen.extend(rng.choice(idx, size=quota[c], replace=False).tolist())
        return ex.subset(sorted(chosen))
    if num_examples >= n:
        return ex
    return ex.subset(np.sort(rng.choice(n, size=num_examples, replace=False)).tolist())
