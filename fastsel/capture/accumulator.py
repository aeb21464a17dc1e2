"""The accumulator: fp32 sums of per-example squared gradients, one tensor per parameter, optionally split by
group of examples, and what is read off them (totals, mean, a checkpointable state).

It knows nothing of hooks or rules: the engine (:mod:`fastsel.capture.per_example`) asks :meth:`group_members`
which group each example of a batch is in, then :meth:`destinations` where the squares of a slice of the batch
go, and adds them there.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

__all__ = ["SquaredGradSums"]

# (group k, (n_k,) int64 indices of its examples in the batch), for each group present in a batch; None: a
# batch without groups (its squares go to the plain sums).
GroupMembers = list[tuple[int, Tensor]] | None
# ((n,) int64 example indices relative to the slice, or None: every example of the slice; {name: sums to add to})
Destination = tuple[Tensor | None, dict[str, Tensor]]


def take(t: Tensor, examples: Tensor | None) -> Tensor:
    """t (B, ...) -> its rows ``examples`` (n, ...), or t itself for None (no copy)."""
    return t if examples is None else t.index_select(0, examples)


class SquaredGradSums:
    """sum_i (d l_i / d theta)**2 per parameter: ``sums`` {name: fp32 tensor shaped like the parameter}.

    With :meth:`enable_groups` (K) a batch whose examples all have a group (ranking confidence,
    :mod:`fastsel.scores.confidence`) adds its squares to ``group_sums[g]`` of each example's group g *only*,
    not to ``sums`` as well: the same work as without groups. :meth:`totals` adds them up.
    ``num_examples`` counts the examples seen; ``fallback_params`` names the parameters that needed the exact
    per-example loop (recorded by the engine, saved with the sums).
    """

    def __init__(self, like: Mapping[str, Tensor]) -> None:
        """like: {name: tensor}, one zero fp32 sum of the same shape and device each."""
        self.sums: dict[str, Tensor] = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in like.items()}
        self.num_examples = 0
        self.fallback_params: set[str] = set()
        self.group_sums: list[dict[str, Tensor]] = []
        self.group_counts: list[int] = []
        self.sums_used = False  # a batch without groups went to ``sums`` (else they are zeros nobody needs to read)

    def enable_groups(self, k: int) -> None:
        """Also keep K per-group sums (memory K x the sums); group_members(groups=...) says each example's group."""
        self.group_sums = [{n: torch.zeros_like(s) for n, s in self.sums.items()} for _ in range(k)]
        self.group_counts = [0] * k

    # -- where a batch's squares go -----------------------------------------------------------------

    def group_members(self, batch_size: int, groups: Tensor | None = None) -> GroupMembers:
        """groups (B,) int: the group of each example of the next batch, or None.

        Returns the members of each group present ((group k, (n_k,) example indices)) and counts them in
        ``group_counts``; None (a batch for the plain ``sums``) when groups are not enabled or not given.
        Raises if an example has no group in 0..K-1: totals() = sums + the group sums needs each example in
        exactly one of them.
        """
        if not self.group_sums or groups is None:
            self.sums_used = True
            return None
        if groups.shape != (batch_size,):
            raise ValueError(f"fastsel: groups must have shape ({batch_size},), got {tuple(groups.shape)}")
        members = []
        for k in range(len(self.group_sums)):
            idx = (groups == k).nonzero().flatten()
            if idx.numel():
                members.append((k, idx))
        if sum(int(idx.numel()) for _, idx in members) != batch_size:
            raise ValueError(f"fastsel: groups must give every example a group in 0..{len(self.group_sums) - 1}")
        for k, idx in members:
            self.group_counts[k] += int(idx.numel())
        return members

    def destinations(self, members: GroupMembers, names: Mapping[str, str] | None = None,
                     start: int = 0, stop: int | None = None) -> list[Destination]:
        """Where the squares of examples start:stop of a batch go (members: from group_members; stop None: the
        whole batch, start ignored).

        Each destination is (example indices relative to ``start``, or None for all of them; {name: sums});
        ``names`` {short name: full name} keys the sums by short name and keeps only those parameters.
        """
        def pick(sums: dict[str, Tensor]) -> dict[str, Tensor]:
            return sums if names is None else {short: sums[full] for short, full in names.items()}

        if members is None:
            return [(None, pick(self.sums))]
        out = []
        for k, idx in members:
            if stop is not None:
                idx = idx[(idx >= start) & (idx < stop)] - start
            if idx.numel():
                out.append((idx, pick(self.group_sums[k])))
        return out

    # -- results -----------------------------------------------------------------------------------

    def totals(self) -> dict[str, Tensor]:
        """The sum of every example's squared gradients: ``sums`` (batches without groups) plus every group's sums."""
        if not self.group_sums:
            return self.sums
        first, *rest = self.group_sums
        out = {n: (s + first[n]) if self.sums_used else first[n].clone() for n, s in self.sums.items()}
        for g in rest:
            for n, t in g.items():
                out[n].add_(t)
        return out

    def mean(self) -> dict[str, Tensor]:
        """The Fisher diagonal estimate: the accumulated totals divided by the number of examples."""
        if self.num_examples == 0:
            raise ValueError("fastsel: no examples were accumulated")
        return {n: s / self.num_examples for n, s in self.totals().items()}

    def state_dict(self) -> dict[str, object]:
        """What resuming needs: ``sums`` only when a batch without groups filled them (else they are all zeros)."""
        sums = self.sums if self.sums_used or not self.group_sums else {}
        state = {"sums": sums, "num_examples": self.num_examples, "fallback_params": sorted(self.fallback_params)}
        if self.group_sums:
            state["group_sums"] = self.group_sums
            state["group_counts"] = list(self.group_counts)
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        for n, t in state["sums"].items():  # type: ignore[union-attr]
            self.sums[n].copy_(t)
        self.sums_used = bool(state["sums"])
        self.num_examples = int(state["num_examples"])  # type: ignore[arg-type]
        self.fallback_params = set(state.get("fallback_params", []))  # type: ignore[union-attr]
        if self.group_sums:
            saved = state.get("group_sums")
            if saved is None or len(saved) != len(self.group_sums):  # type: ignore[arg-type]
                raise ValueError("fastsel: the checkpoint has no (or other) per-group Fisher sums")
            for mine, theirs in zip(self.group_sums, saved):  # type: ignore[arg-type]
                for n, t in theirs.items():
                    mine[n].copy_(t)
            self.group_counts = [int(c) for c in state["group_counts"]]  # type: ignore[union-attr]
