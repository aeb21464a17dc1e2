"""The variability metric: ``fastsel score --metric variability`` in memory and in the streamed pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import Tensor

from fastsel.capture.taps import PooledStates
from fastsel.pipeline.context import PipelineContext, ScoringContext
from fastsel.pipeline.distributed import all_merge_class_stats, all_reduce_sum_
from fastsel.pipeline.drivers.probing import NumrankOptions, attach_probes
from fastsel.pipeline.registry import (
    BatchConsumer,
    Metric,
    options_of,
    register_metric,
)
from fastsel.scores.confidence import confidence_from_groups
from fastsel.scores.layer_scores import LayerScores
from fastsel.scores.plot import plot_layer_curves
from fastsel.scores.variability import (
    VARIANTS,
    ClassStatistics,
    ClassStatisticsAccumulation,
    accumulate_class_statistics,
    merge_class_stats,
    variability_layer_scores,
    variability_ratio,
)
from fastsel.utils.settings import setting

__all__ = ["VariabilityOptions", "VariabilityConsumer"]


@dataclass(frozen=True)
class VariabilityOptions(NumrankOptions):
    variant: str = setting("xie", "xie: class-balanced Sigma_w, Sigma_b (section 3.1); papyan: frequency-weighted, global "
                          "mean (appendix A.1)", choices=VARIANTS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"fastsel: unknown variant {self.variant!r}; choose from {VARIANTS}")


class VariabilityConsumer(BatchConsumer):
    """Class statistics inside :func:`fastsel.pipeline.run_pass`.

    ``capture`` taps every block while the shared forward runs (the same forward the Fisher backward
    uses with ``--metric fisher,variability``), so no hidden states are kept; the statistics are
    checkpointable (``state_dict``) and merged exactly over ranks (Chan's formula, in rank order).
    """

    name = "variability"
    needs_backward = False
    needs_hidden_states = False  # hooks on the blocks, not output_hidden_states
    supports_stability = True

    def __init__(self, ctx: PipelineContext) -> None:
        opts = options_of(VariabilityOptions, ctx.config.options)
        self.ctx = ctx
        self.pooling, self.variant = opts.pooling, opts.variant
        # ranking confidence (fastsel.scores.confidence): one set of class statistics per group of examples
        self.groups = ctx.config.confidence_groups
        self.acc = ClassStatisticsAccumulation(ctx.model, ctx.layer_map, ctx.task.num_labels, pooling=self.pooling,
                                               groups=self.groups)
        self.stats, self.group_stats = self.acc.stats, self.acc.group_stats

    def pass_hooks(self) -> ContextManager[Any]:
        return self.acc.hooked()

    def capture(self, batch: Mapping[str, Tensor]) -> ContextManager[Any]:
        return self.acc.capture(batch)

    def consume(self, batch: Mapping[str, Tensor], outputs: Any) -> None:
        self.acc.consume(batch, outputs)

    def state_dict(self) -> dict[str, Any]:
        state = self.stats.state_dict()
        if self.groups:
            state["groups"] = [g.state_dict() for g in self.group_stats]
        return state

    def finite_flag(self) -> Tensor | None:
        """0-dim bool tensor: every class statistic is finite (checked by the pass, one sync per batch)."""
        st = self.stats
        # a sum is NaN/Inf when any element is (finite float64 statistics do not overflow): one cheap read
        totals = [t.sum() for ts in (st.mean, st.m2) for t in ts if t is not None]
        return torch.isfinite(torch.stack(totals)).all() if totals else None

    def zero_(self) -> None:
        for st in (self.stats, *self.group_stats):
            st.zero_()

    def first_nonfinite(self) -> str | None:
        st = self.stats
        for i in range(st.num_layers):
            for what, t in (("mean", st.mean[i]), ("scatter", st.m2[i])):
                if t is not None and not bool(torch.isfinite(t).all()):
                    return f"class {what} of {'the embeddings' if i == 0 else f'block {i - 1}'} (variability statistics)"
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stats.load_state_dict(state, self.ctx.device)
        if self.groups:
            saved = state.get("groups")
            if saved is None or len(saved) != self.groups:
                raise ValueError("fastsel: the checkpoint has no (or other) per-group class statistics")
            for g, st in zip(self.group_stats, saved):
                g.load_state_dict(st, self.ctx.device)

    def all_reduce(self, group: Any = None) -> None:

        for st in [self.stats, *self.group_stats]:
            self._fill_empty(st)
            for i in range(st.num_layers):
                st.count[i], st.mean[i], st.m2[i] = all_merge_class_stats(st.count[i], st.mean[i], st.m2[i], group)
            counters = torch.tensor([st.num_examples, st.num_skipped], dtype=torch.float64, device=self.ctx.device)
            all_reduce_sum_([counters], group)
            st.num_examples, st.num_skipped = (int(v) for v in counters.tolist())

    def _fill_empty(self, st: ClassStatistics) -> None:
        """Layers without data (a rank or group that saw none) get empty classes."""
        width = int(getattr(self.ctx.model.config, "hidden_size", 0) or getattr(self.ctx.model.config, "dim"))
        for i in range(st.num_layers):
            if st.count[i] is None:
                st.count[i] = torch.zeros(st.num_classes, dtype=torch.float64, device=self.ctx.device)
                st.mean[i] = torch.zeros(st.num_classes, width, dtype=st.dtype, device=self.ctx.device)
                st.m2[i] = torch.zeros(st.num_classes, width, width, dtype=st.dtype, device=self.ctx.device)

    def stability_scores(self, active: bool) -> Callable[[list[int]], list[float]]:
        """Mid-pass (--until-stable): scores_of(groups) on the groups so far, merged over the ranks (copies)."""

        copies = []
        for g in self.group_stats:
            self._fill_empty(g)
            c = ClassStatistics(g.num_layers, g.num_classes, g.dtype)
            for i in range(g.num_layers):
                t = tuple(x.clone() for x in g.layer(i))
                c.count[i], c.mean[i], c.m2[i] = all_merge_class_stats(*t, None) if active else t
            copies.append(c)
        return lambda groups: self.group_scores(groups, copies)

    def group_scores(self, groups: list[int], group_stats: list[ClassStatistics] | None = None) -> list[float]:
        """nu of blocks 0..L-1 on the examples of ``groups`` alone (their class statistics merged exactly)."""

        group_stats = self.group_stats if group_stats is None else group_stats
        out = []
        for i in range(1, self.stats.num_layers):
            merged = None
            for g in groups:
                self._fill_empty(group_stats[g])
                part = group_stats[g].layer(i)
                merged = part if merged is None else merge_class_stats(*merged, *part)
            out.append(variability_ratio(*merged, variant=self.variant)["nu"])  # type: ignore[misc]
        return out

    def result(self) -> "LayerScores":
        if self.stats.num_examples == 0:
            raise ValueError("fastsel: no examples to compute the variability ratio on (empty data)")
        cfg = self.ctx.config
        scores = variability_layer_scores(self.stats, self.ctx.layer_map, variant=self.variant, pooling=self.pooling,
                                          model_name=cfg.model, task=self.ctx.task.name, split=cfg.split)
        if self.groups:
            scores.info["ranking_confidence"] = confidence_from_groups([l.score for l in scores.layers], self.group_scores,
                                                                       self.groups, False, self.ctx.confidence_unit)
        return scores


def _variability_run(ctx: ScoringContext) -> LayerScores:
    opts = options_of(VariabilityOptions, ctx.config.options)
    probe_states = PooledStates() if opts.probe else None
    stats = accumulate_class_statistics(
        ctx.model,
        ctx.loader(),
        num_classes=ctx.task.num_labels,
        pooling=opts.pooling,
        layer_map=ctx.layer_map,
        total=len(ctx.features),
        progress=ctx.progress,
        on_layer=probe_states,
    )
    scores = variability_layer_scores(stats, ctx.layer_map, variant=opts.variant, pooling=opts.pooling,
                                      model_name=ctx.config.model, task=ctx.task.name, split=ctx.config.split)
    if probe_states is not None:
        attach_probes(ctx, scores, probe_states.result())
    return scores


register_metric(Metric(name="variability", run=_variability_run, consumer=VariabilityConsumer, options=VariabilityOptions,
                       higher_is_better=False, classification_only=True, plot=plot_layer_curves,
                       default_examples=2000))  # hidden-state variability ratio nu per layer (Xie et al. 2022); l* = argmin
