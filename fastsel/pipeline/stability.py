"""``--until-stable``: stop the streamed pass once the ranking of every metric is stable.

Every ``check_every_examples`` examples (a fixed number of batches per rank) the pass asks each consumer for the scores of
its confidence groups so far (:meth:`fastsel.pipeline.registry.BatchConsumer.stability_scores`) and stops when, for
every metric, Kendall tau between the rankings of the two halves of the groups is at least ``stable_tau`` and the
top-3 set of the ranking on all groups is unchanged over the last ``stable_checks`` checks.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Mapping

import torch

from fastsel.pipeline.context import PipelineContext
from fastsel.pipeline.distributed import DistEnv, all_reduce_sum_
from fastsel.pipeline.registry import METRICS, BatchConsumer
from fastsel.scores.confidence import halves, kendall_tau_b, ranking_order

__all__ = ["StabilityWatch"]


class StabilityWatch:
    """--until-stable: every ``check_every_examples`` examples (a fixed number of batches per rank, the same points on
    every rank and on resume), the ranking of each consumer on the groups so far (reduced over the ranks):
    stable when, for every consumer, Kendall tau between the halves >= stable_tau and the top-3 set of the
    ranking on all groups is the same over the last ``stable_checks`` checks."""

    def __init__(self, ctx: PipelineContext, consumers: list[BatchConsumer], env: DistEnv, schedule: list) -> None:

        self.ctx, self.consumers, self.env = ctx, consumers, env
        self.pcfg = ctx.pipeline
        self.k = ctx.config.confidence_groups
        if self.k < 2:
            raise ValueError("fastsel: --until-stable needs the ranking confidence (--confidence-groups K >= 2, not 0)")
        for c in consumers:
            if not c.supports_stability:
                raise ValueError(f"fastsel: --until-stable: metric {c.name!r} has no ranking confidence")
        self.halves = halves(self.k)
        total = max(1, ctx.num_examples)
        per_batch = total / max(1, len(schedule))
        self.batches = max(1, round(self.pcfg.check_every_examples / per_batch / env.world_size))  # per rank, per check
        self.last = len(schedule) // env.world_size  # every rank has at least this many batches
        self.history: list[dict[str, Any]] = []
        self.stopped = False

    def due(self, cursor: int) -> bool:
        return cursor % self.batches == 0 and cursor <= self.last

    def check(self, cursor: int, examples: int) -> bool:
        """One check (a collective under torchrun); True: stop now."""

        entry: dict[str, Any] = {"batches_per_rank": cursor}
        ok = True
        for c in self.consumers:
            scores_of = c.stability_scores(self.env.active)
            try:
                full, a, b = scores_of(list(range(self.k))), scores_of(self.halves[0]), scores_of(self.halves[1])
                tau = kendall_tau_b(a, b)

                hib = METRICS[c.name].higher_is_better if c.name in METRICS else True
                top = sorted(ranking_order(full, hib)[:3])
            except ValueError:  # too few examples per class in a half
                tau, top = float("nan"), None
            entry[c.name] = {"kendall_tau_halves": None if math.isnan(tau) else round(tau, 6), "top3": top}
            recent = [h[c.name]["top3"] for h in self.history[-(self.pcfg.stable_checks - 1):]] if self.pcfg.stable_checks > 1 else []
            ok = ok and not math.isnan(tau) and tau >= self.pcfg.stable_tau and top is not None and \
                len(recent) == self.pcfg.stable_checks - 1 and all(r == top for r in recent)
        flag = torch.tensor([1.0 if ok else 0.0, float(examples)], dtype=torch.float64, device=self.ctx.device)
        if self.env.active:  # every rank takes the same decision
            all_reduce_sum_([flag])
        ok = float(flag[0]) > 0
        entry["examples"] = int(flag[1])
        self.history.append(entry)
        self.stopped = ok
        return ok

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "stopped": self.stopped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.stopped = bool(state.get("stopped", False))

    def report(self, total: int) -> dict[str, Any]:
        used = self.history[-1]["examples"] if self.stopped else total
        d = {"stable": self.stopped, "reached_end": not self.stopped, "examples_used": used, "examples_available": total,
             "stable_tau": self.pcfg.stable_tau, "check_every_examples": self.pcfg.check_every_examples,
             "stable_checks": self.pcfg.stable_checks, "checks": self.history}
        if not self.stopped and self.env.is_main:
            print(f"fastsel: note: --until-stable reached the end of the data ({total} examples) before the ranking was "
                  f"stable (Kendall tau between halves >= {self.pcfg.stable_tau} and the top-3 unchanged over "
                  f"{self.pcfg.stable_checks} checks); the scores use all of it", file=sys.stderr)
            d["note"] = "reached the end of the data before the ranking was stable"
        return d
