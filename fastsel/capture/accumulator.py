"""The accumulator: fp32 sums of per-example squared gradients, one tensor per parameter, optionally split by
group of examples, and what is read off them (totals, mean, a checkpointable state).

It knows nothing of hooks or rules: the engine (:mod:`fastsel.capture.per_example`) asks :meth:`group_members`
which group each example of a batch is in, then :meth:`destinations` where the squares of a slice of the batch
go, and adds them there.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor

from fastsel.utils.groups import group_rows, num_rows

__all__ = ["SquaredGradSums"]

# Which examples of a batch: (n,) int64 indices, a slice of the batch (examples sorted by group: a view, no
# copy), or None (all of them).
Examples = Tensor | slice | None
# (group k, its examples in the batch), for each group present in a batch; None: a batch without groups (its
# squares go to the plain sums).
GroupMembers = list[tuple[int, Tensor | slice]] | None
# (examples relative to the slice of the batch, or None: every example of the slice; {name: sums to add to})
Destination = tuple[Examples, dict[str, Tensor]]


def _within(examples: Tensor | slice, start: int, stop: int) -> Tensor | slice | None:
    """The batch positions ``examples`` that fall in start:stop, relative to start; None when there are none."""
    if isinstance(examples, slice):
        lo, hi = max(examples.start, start) - start, min(examples.stop, stop) - start
        return slice(lo, hi) if hi > lo else None
    idx = examples[(examples >= start) & (examples < stop)] - start
    return idx if idx.numel() else None


class SquaredGradSums:
    """sum_i (d l_i / d theta)**2 per parameter, fp32, shaped like the parameter.

    ``sums`` {name: tensor} holds the plain sums. With :meth:`enable_groups` (K, names) a batch whose examples
    all have a group (ranking confidence, :mod:`fastsel.scores.confidence`) adds the squares of the grouped
    parameters (``group_names``: by default all; the Fisher driver groups the blocks, which alone are ranked) to
    ``group_sums[g]`` of each example's group g *only*, and those of the other parameters to ``sums``: the same
    work as without groups, and K sums only of what the confidence reads. The plain sums of the grouped
    parameters exist only once a batch without groups filled them (``sums_used``). :meth:`totals` adds it all up.
    ``num_examples`` counts the examples seen; ``fallback_params`` names the parameters that needed the exact
    per-example loop (recorded by the engine, saved with the sums).
    """

    def __init__(self, like: Mapping[str, Tensor]) -> None:
        """like: {name: tensor}, one zero fp32 sum of the same shape and device each."""
        self.param_names: list[str] = list(like)
        self.sums: dict[str, Tensor] = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in like.items()}
        self.num_examples = 0
        self.fallback_params: set[str] = set()
        self.group_names: frozenset[str] = frozenset()
        self.group_sums: list[dict[str, Tensor]] = []
        self.group_counts: list[int] = []
        self._like: dict[str, tuple[torch.Size, torch.device]] = {n: (p.shape, p.device) for n, p in like.items()}
        self.sums_used = False  # a batch without groups went to ``sums`` (else the grouped parameters have none)
        self.released = False  # mean(release=True) turned the plain sums into means: the sums are spent

    def _check_live(self) -> None:
        if self.released:
            raise RuntimeError("fastsel: these squared-gradient sums were turned into means (mean(release=True)); "
                               "they cannot be accumulated, read or saved again")

    def enable_groups(self, k: int, names: Iterable[str] | None = None) -> None:
        """Also keep K per-group sums of ``names`` (default: every parameter); group_members(groups=...) says each
        example's group. Memory: K x the sums of those parameters."""
        grouped = set(self.param_names if names is None else names)
        unknown = grouped - set(self.param_names)
        if unknown:
            raise ValueError(f"fastsel: cannot group parameters that are not accumulated: {sorted(unknown)[:3]}")
        self.group_names = frozenset(grouped)
        ordered = [n for n in self.param_names if n in grouped]
        for n in ordered:  # allocated again if a batch without groups comes (allocate_plain_sums)
            self.sums.pop(n, None)
        self.group_sums = [{n: self._zeros(n) for n in ordered} for _ in range(k)]
        self.group_counts = [0] * k

    def _zeros(self, name: str) -> Tensor:
        shape, device = self._like[name]
        return torch.zeros(shape, dtype=torch.float32, device=device)

    def allocate_plain_sums(self) -> None:
        """Plain sums for every parameter (the grouped ones get theirs on first use: a batch without groups)."""
        for n in self.param_names:
            if n not in self.sums:
                self.sums[n] = self._zeros(n)
        self.sums_used = True

    # -- where a batch's squares go -----------------------------------------------------------------

    def group_members(self, batch_size: int, groups: Tensor | None = None) -> GroupMembers:
        """groups (B,) int: the group of each example of the next batch, or None.

        Returns the members of each group present ((group k, its examples: a slice of the batch when the batch
        is sorted by group, else (n_k,) indices on the parameters' device)) and counts them in ``group_counts``;
        None (a batch for the plain ``sums``) when groups are not enabled or not given. Raises if an example
        has no group in 0..K-1: totals() = sums + the group sums needs each example in exactly one of them.
        Groups on the CPU cost no device sync (the streamed pass keeps the example index there).
        """
        self._check_live()
        if not self.group_sums or groups is None:
            self.allocate_plain_sums()
            return None
        if groups.shape != (batch_size,):
            raise ValueError(f"fastsel: groups must have shape ({batch_size},), got {tuple(groups.shape)}")
        device = next(iter(self._like.values()))[1]  # the model's: where a batch's rows are taken from
        members = group_rows(groups, len(self.group_sums), device)
        for g, rows in members:
            self.group_counts[g] += num_rows(rows)
        return members

    def destinations(self, members: GroupMembers, names: Mapping[str, str] | None = None,
                     start: int = 0, stop: int | None = None) -> list[Destination]:
        """Where the squares of examples start:stop of a batch go (members: from group_members; stop None: the
        whole batch, start ignored).

        Each destination is (examples relative to ``start``: indices, a slice, or None for all of them;
        {name: sums}), never empty; ``names`` {short name: full name} keys the sums by short name and keeps only
        those parameters. In a grouped batch the grouped parameters go to their example's group, the others to
        the plain sums (every example).
        """
        pairs = [(n, n) for n in self.param_names] if names is None else list(names.items())
        if members is None:
            plain = {s: self.sums[f] for s, f in pairs if f in self.sums}
            return [(None, plain)] if plain else []
        plain = {s: self.sums[f] for s, f in pairs if f not in self.group_names}
        grouped = [(s, f) for s, f in pairs if f in self.group_names]
        out: list[Destination] = [(None, plain)] if plain else []
        if grouped:
            for k, examples in members:
                rel = examples if stop is None else _within(examples, start, stop)
                if rel is not None:
                    out.append((rel, {s: self.group_sums[k][f] for s, f in grouped}))
        return out

    # -- results -----------------------------------------------------------------------------------

    def totals(self) -> dict[str, Tensor]:
        """The sum of every example's squared gradients: ``sums`` plus every group's sums (new tensors for the grouped
        parameters, the plain sums themselves for the others)."""
        self._check_live()
        if not self.group_sums:
            return self.sums
        out = {}
        for n in self.param_names:
            if n not in self.group_names:
                out[n] = self.sums[n]
                continue
            first, *rest = (g[n] for g in self.group_sums)
            t = self.sums[n] + first if n in self.sums else first.clone()
            for r in rest:
                t.add_(r)
            out[n] = t
        return out

    def mean(self, release: bool = False) -> dict[str, Tensor]:
        """The Fisher diagonal estimate: the accumulated totals divided by the number of examples.

        release: divide in place, with no copy: the plain sums themselves become the means (the caller's last read of
        them). The group sums are kept; the accumulator is spent (accumulating, reading totals or saving it raises).
        """
        if self.num_examples == 0:
            raise ValueError("fastsel: no examples were accumulated")
        totals = self.totals()
        # The totals of grouped parameters are new tensors (divided in place: no second copy); the others are the
        # plain sums themselves, which stay sums unless released.
        fresh = self.group_names if self.group_sums else frozenset()
        out = {n: s.div_(self.num_examples) if release or n in fresh else s / self.num_examples for n, s in totals.items()}
        self.released = release
        return out

    def accumulators(self) -> list[tuple[str, Tensor]]:
        """Every sum in use, named: the plain sums, then each group's."""
        self._check_live()
        out = list(self.sums.items())
        for g in self.group_sums:
            out += list(g.items())
        return out

    def state_dict(self) -> dict[str, object]:
        """What resuming needs: the plain sums that exist (those of grouped parameters only once used) and the
        group sums."""
        self._check_live()
        state = {"sums": self.sums, "num_examples": self.num_examples, "fallback_params": sorted(self.fallback_params)}
        if self.group_sums:
            state["group_sums"] = self.group_sums
            state["group_counts"] = list(self.group_counts)
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        saved_sums: dict[str, Tensor] = state["sums"]  # type: ignore[assignment]
        if self.group_sums and self.group_names & set(saved_sums):
            self.allocate_plain_sums()
        for n, t in saved_sums.items():
            self.sums[n].copy_(t)
        if not self.group_sums:
            self.sums_used = bool(saved_sums)
        self.num_examples = int(state["num_examples"])  # type: ignore[arg-type]
        self.fallback_params = set(state.get("fallback_params", []))  # type: ignore[union-attr]
        if self.group_sums:
            saved = state.get("group_sums")
            if (saved is None or len(saved) != len(self.group_sums)  # type: ignore[arg-type]
                    or any(set(theirs) != set(self.group_names) for theirs in saved)):  # type: ignore[union-attr]
                raise ValueError("fastsel: the checkpoint has no (or other) per-group Fisher sums")
            for mine, theirs in zip(self.group_sums, saved):  # type: ignore[arg-type]
                for n, t in theirs.items():
                    mine[n].copy_(t)
            self.group_counts = [int(c) for c in state["group_counts"]]  # type: ignore[union-attr]
