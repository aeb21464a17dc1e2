"""The Fisher metric: ``fastsel score --metric fisher`` in memory and in the streamed pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import Tensor

from fastsel.pipeline.context import PipelineContext, ScoringContext
from fastsel.pipeline.distributed import all_gather_objects, all_reduce_sum_
from fastsel.pipeline.registry import Metric, confidence_groups, option, options_of, register_metric
from fastsel.scores.confidence import confidence_from_groups
from fastsel.scores.fisher import FISHER_MODES, FisherAccumulation, fisher_layer_scores, fisher_scores
from fastsel.scores.layer_scores import LayerScores

__all__ = ["FisherOptions", "FisherConsumer"]


@dataclass(frozen=True)
class FisherOptions:
    fisher: str = option("empirical", "labels of the log-likelihood: gold (empirical), sampled from the model, or the "
                         "exact expectation", choices=FISHER_MODES)

    def __post_init__(self) -> None:
        if self.fisher not in FISHER_MODES:
            raise ValueError(f"fastsel: unknown Fisher mode {self.fisher!r}; choose from {FISHER_MODES}")


def _fisher_run(ctx: ScoringContext) -> LayerScores:
    mode = options_of(FisherOptions, ctx.config.options).fisher
    scores, _ = fisher_layer_scores(
        ctx.model,
        ctx.loader(),
        mode=mode,
        seed=ctx.config.seed,
        total=len(ctx.features),
        progress=ctx.progress,
        layer_map=ctx.layer_map,
        model_name=ctx.config.model,
        task=ctx.task.name,
        split=ctx.config.split,
    )
    return scores


class FisherConsumer:
    """Fisher diagonal of the shared pass: per-example squared gradients of the log-likelihood.

    Wraps :class:`SquaredGradAccumulator`: ``capture`` hooks the model for the batch, ``consume`` turns
    the logits into the likelihood terms (labels sampled per *global* example index) and runs the
    backward. Sums are fp32 (whatever the autocast dtype); the rank reduction sums them in fp64.
    """

    name = "fisher"
    needs_backward = True
    needs_hidden_states = False

    def __init__(self, ctx: PipelineContext) -> None:
        self.ctx = ctx
        self.groups = confidence_groups(ctx.config)
        self.fisher = FisherAccumulation(ctx.model, options_of(FisherOptions, ctx.config.options).fisher, ctx.config.seed,
                                         groups=self.groups)
        self.mode, self.acc = self.fisher.mode, self.fisher.acc

    def capture(self, batch: Mapping[str, Tensor]) -> ContextManager[Any]:
        return self.fisher.capture(batch)

    def consume(self, batch: Mapping[str, Tensor], outputs: Any) -> None:
        self.fisher.consume(batch, outputs)

    def state_dict(self) -> dict:
        cpu = lambda d: {n: t.detach().cpu().clone() for n, t in d.items()}  # noqa: E731
        return {k: (cpu(v) if k == "sums" else [cpu(g) for g in v] if k == "group_sums" else v)
                for k, v in self.acc.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.acc.load_state_dict(state)

    def _sums(self) -> dict[str, Tensor]:
        sums = getattr(self.acc, "sums", None)
        return sums if isinstance(sums, dict) else self.acc.state_dict().get("sums", {})

    def finite_flag(self) -> Tensor | None:
        """0-dim bool tensor: every accumulator is finite (no host sync here).

        The sums are non-negative, so the sum of each is finite exactly when all its elements are (short of a
        total above the float range, itself a broken Fisher): one read of the accumulators, no temporaries;
        far cheaper than ``isfinite(t).all()`` on a CPU.
        """
        totals = [t.sum() for t in self._sums().values() if t.is_floating_point()]
        return torch.isfinite(torch.stack(totals)).all() if totals else None

    def first_nonfinite(self) -> str | None:
        """The first accumulator (in the model's parameter order) holding NaN/Inf, named, or None."""
        sums = self._sums()
        order = [n for n, _ in self.ctx.model.named_parameters() if n in sums] + sorted(set(sums) - set(dict(self.ctx.model.named_parameters())))
        for n in order:
            t = sums[n]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"Fisher accumulator of parameter {n} ({self.ctx.layer_map.describe(n)})"
        return None

    def all_reduce(self, group: Any = None) -> None:
        names = sorted(self.acc.sums)
        all_reduce_sum_([self.acc.sums[n] for n in names], group)
        count = torch.tensor([float(self.acc.num_examples)], dtype=torch.float64, device=self.acc.sums[names[0]].device)
        all_reduce_sum_([count], group)
        self.acc.num_examples = int(count.item())
        if self.groups:
            all_reduce_sum_([g[n] for g in self.acc.group_sums for n in names], group)
            counts = torch.tensor(self.acc.group_counts, dtype=torch.float64, device=count.device)
            all_reduce_sum_([counts], group)
            self.acc.group_counts = [int(c) for c in counts.tolist()]
        fallback = all_gather_objects(sorted(self.acc.fallback_params), group)
        self.acc.fallback_params = set().union(*map(set, fallback))

    def result(self) -> LayerScores:
        cfg = self.ctx.config
        scores = fisher_scores(self.fisher.result(), self.ctx.model, self.ctx.layer_map, model_name=cfg.model,
                               task=self.ctx.task.name, split=cfg.split)
        if self.groups:
            scores.info["ranking_confidence"] = self.confidence(scores)
        return scores

    def group_scores(self, groups: list[int], group_sums: list[dict[str, Tensor]] | None = None,
                     group_counts: list[int] | None = None) -> list[float]:
        """Layer scores of the examples of ``groups`` alone."""
        return self.fisher.group_scores(groups, self.ctx.layer_map, group_sums, group_counts)

    def stability_scores(self, active: bool) -> Callable[[list[int]], list[float]]:
        """Mid-pass: scores_of(groups) on the groups so far, reduced over the ranks (copies; this rank's
        accumulators are untouched)."""
        names = sorted(self.acc.sums)
        sums = [{n: g[n].detach().clone() for n in names} for g in self.acc.group_sums]
        counts = list(self.acc.group_counts)
        if active:
            all_reduce_sum_([g[n] for g in sums for n in names])
            c = torch.tensor(counts, dtype=torch.float64, device=sums[0][names[0]].device)
            all_reduce_sum_([c])
            counts = [int(v) for v in c.tolist()]
        return lambda groups: self.group_scores(groups, sums, counts)

    def confidence(self, scores: LayerScores) -> dict:

        return confidence_from_groups([l.score for l in scores.layers], self.group_scores, self.groups, True)


register_metric(Metric(name="fisher", run=_fisher_run, consumer=FisherConsumer, options=FisherOptions, higher_is_better=True,
                       needs_labels=True, default_examples=200,
                       help="diagonal Fisher information per layer (Lodha et al. 2023)"))
