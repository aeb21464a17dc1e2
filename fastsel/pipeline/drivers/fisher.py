"""The Fisher metric: ``fastsel score --metric fisher`` in memory and in the streamed pass."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastsel.data.corpus import BatchReader, schedule_batches, shard_batches
from fastsel.data.features import make_dataloader
from fastsel.hf.io import eval_mode, model_inputs
from fastsel.pipeline.context import PipelineContext, ScoringContext
from fastsel.pipeline.distributed import (
    all_gather_objects,
    all_reduce_sum_,
    broadcast_from_rank0_,
    process_rank,
    world_size,
)
from fastsel.pipeline.heads import (
    AUTO_MIN_EXAMPLES,
    DEFAULT_HEAD,
    HEAD_METAVAR,
    PreparedHead,
    head_parameter_names,
    parse_head,
    save_head,
    setup_head,
)
from fastsel.pipeline.registry import (
    BatchConsumer,
    Metric,
    autocast_context,
    options_of,
    register_metric,
)
from fastsel.scores.confidence import confidence_from_groups, kendall_tau_b, method
from fastsel.scores.fisher import (
    AGGREGATES,
    FISHER_MODES,
    FisherAccumulation,
    block_aggregates,
    fisher_diagonal,
    fisher_scores,
    layer_statistics,
)
from fastsel.scores.layer_scores import LayerScores
from fastsel.utils.settings import setting

__all__ = ["FisherOptions", "FisherConsumer", "LABEL_FREE_TAU", "label_subset", "permuted_labels", "label_dependence"]


LABEL_FREE_TAU = 0.9  # a ranking is label-free when Kendall tau-b against the permuted-label ranking is at least this


@dataclass(frozen=True)
class FisherOptions:
    fisher: str = setting("empirical", "labels of the log-likelihood: gold (empirical), sampled from the model, or the "
                         "exact expectation", choices=FISHER_MODES)
    head: str = setting(DEFAULT_HEAD, "where the classification head comes from: auto (probe when at least "
                        f"{AUTO_MIN_EXAMPLES} training examples are not scored, else fresh), probe (the model's head fitted "
                        "first on the frozen backbone), fresh (seeded random, the paper's; its ranking is nearly "
                        "label-free), warmup:STEPS (a short full fine-tuning), or a checkpoint folder "
                        "(docs/task_aware.md)", metavar=HEAD_METAVAR)
    probe_examples: int = setting(1000, "--head auto / probe / warmup: training examples it fits on (none of them scored)",
                                  metavar="N")
    aggregate: str = setting("frobenius", "how a block's Fisher diagonal becomes its score: " + "; ".join(
        f"{k}: {v}" for k, v in AGGREGATES.items()), choices=tuple(AGGREGATES))
    label_check: float = setting(0.2, "label-dependence check: the share of the scored examples rescored with permuted "
                                "labels (and, for a fitted head, a head fitted on permuted labels); 0: off", metavar="F")
    save_head: str | None = setting(None, "write the model with the head it scored with to this folder (a Hugging Face "
                                   "checkpoint: --head DIR or finetune --model DIR start from it)", metavar="DIR")

    def __post_init__(self) -> None:
        if self.fisher not in FISHER_MODES:
            raise ValueError(f"fastsel: unknown Fisher mode {self.fisher!r}; choose from {FISHER_MODES}")
        parse_head(self.head)
        if not isinstance(self.probe_examples, int) or self.probe_examples < 10:
            raise ValueError(f"fastsel: --probe-examples must be an integer >= 10, got {self.probe_examples!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"fastsel: unknown --aggregate {self.aggregate!r}; choose from {sorted(AGGREGATES)}")
        if not (isinstance(self.label_check, (int, float)) and 0 <= self.label_check < 1):
            raise ValueError(f"fastsel: --label-check must be a share in [0, 1) (0: off), got {self.label_check!r}")
        if self.aggregate == "label_specific" and self.label_check == 0:
            raise ValueError("fastsel: --aggregate label_specific needs the label-dependence check (--label-check > 0)")


def label_subset(num_examples: int, share: float, seed: int) -> np.ndarray:
    """(M,) sorted example positions of the label-dependence check: a seeded ceil(share * N) of the N scored (M >= 2)."""
    m = min(num_examples, max(2, math.ceil(share * num_examples)))
    return np.sort(np.random.default_rng([seed, 0x1AB]).choice(num_examples, size=m, replace=False))


def permuted_labels(labels: np.ndarray, subset: np.ndarray, seed: int) -> dict[int, Any]:
    """{position: label} for ``subset``: its labels permuted among themselves (seeded)."""
    order = np.random.default_rng([seed, 0x1AC]).permutation(len(subset))
    return {int(i): labels[int(subset[j])].item() for i, j in zip(subset, order)}


def label_dependence(model: nn.Module, layer_map: Any, mode: str, seed: int, head: PreparedHead,
                     batches: Callable[[], Iterable[dict[str, Tensor]]], main: Mapping[str, Sequence[float]], aggregate: str,
                     subset_size: int, share: float, reduce: Callable[[FisherAccumulation], None] | None = None,
                     autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                     share_head: Callable[[], None] | None = None) -> tuple[dict, list[float]]:
    """(scores.json ``label_dependence``, the permuted-label frobenius score of every block).

    ``batches()`` yields the subset's batches with their labels already permuted; under the permuted head (a probe
    refitted on permuted labels) the Fisher of those batches is ranked and compared with ``main`` (the run's
    :func:`block_aggregates`) by ``aggregate``. A mode that reads no labels with a head fitted to none is label-free by construction.
    """
    key = "frobenius" if aggregate == "label_specific" else aggregate
    rule = (f"label_free when Kendall tau-b between the ranking and the ranking with permuted labels is >= {LABEL_FREE_TAU}; "
            "docs/task_aware.md")
    if mode != "empirical" and not head.fits_labels:
        return ({"kendall_tau_vs_permuted_labels": 1.0, "label_free": True, "rule": rule, "examples": 0,
                 "by_construction": f"the {mode} Fisher reads no labels and the {head.info.get('kind')} head was fitted "
                                    "to none"}, list(main["frobenius"]))  # the same Fisher: label_specific is 1
    start = time.perf_counter()
    with head.permuted_labels(seed):
        if share_head is not None:
            share_head()
        acc = FisherAccumulation(model, mode, seed)
        with eval_mode(model):
            for batch in batches():
                with acc.capture(batch):
                    with autocast():
                        outputs = model(**model_inputs(batch))
                    acc.consume(batch, outputs)
        if reduce is not None:
            reduce(acc)
        layers, _ = layer_statistics(acc.result(release=True).diagonal, model, layer_map)  # read once: no copy
    permuted = block_aggregates(layers)
    tau = kendall_tau_b(list(main[key]), permuted[key])
    info = {"kendall_tau_vs_permuted_labels": round(tau, 6) if math.isfinite(tau) else None,
            "label_free": bool(math.isfinite(tau) and tau >= LABEL_FREE_TAU), "rule": rule,
            "compared": key, "examples": subset_size, "share": share,
            "permuted_ranking": sorted(range(len(layers)), key=lambda l: (-permuted[key][l], l)),
            "permuted_scores": permuted[key], "seconds": round(time.perf_counter() - start, 3),
            "head": "refitted on permuted labels" if head.fits_labels else "the same head; only the labels permuted"}
    if head.permuted_info is not None:
        info["permuted_head"] = {k: head.permuted_info[k] for k in ("heldout_metrics", "baseline", "best_epoch")
                                 if k in head.permuted_info}
    return info, permuted["frobenius"]


def _fisher_run(ctx: ScoringContext) -> LayerScores:
    opts = options_of(FisherOptions, ctx.config.options)
    head = setup_head(ctx.config, opts.head, opts.probe_examples, ctx.model, ctx.tokenizer, ctx.layer_map, ctx.task,
                      next(ctx.model.parameters()).device, ctx.progress)
    if opts.save_head:
        save_head(ctx.model, ctx.tokenizer, opts.save_head)
    result = fisher_diagonal(ctx.model, ctx.loader(), mode=opts.fisher, seed=ctx.config.seed, total=len(ctx.features),
                             progress=ctx.progress)
    check, permuted = None, None
    statistics = layer_statistics(result.diagonal, ctx.model, ctx.layer_map)
    if opts.label_check > 0:
        main = block_aggregates(statistics[0])
        subset = label_subset(len(ctx.features), opts.label_check, ctx.config.seed)
        labels = np.asarray([f["labels"] for f in ctx.features])
        new = permuted_labels(labels, subset, ctx.config.seed)
        feats = [{**ctx.features[i], "labels": new[int(i)]} for i in subset]
        device = next(ctx.model.parameters()).device

        def batches() -> Iterator[dict[str, Tensor]]:
            for batch in make_dataloader(feats, ctx.tokenizer, ctx.config.batch_size):
                yield {k: v.to(device) for k, v in batch.items()}

        check, permuted = label_dependence(ctx.model, ctx.layer_map, opts.fisher, ctx.config.seed, head, batches,
                                           main, opts.aggregate, len(subset), opts.label_check)
    scores = fisher_scores(result, ctx.model, ctx.layer_map, model_name=ctx.config.model, task=ctx.task.name,
                           split=ctx.config.split, aggregate=opts.aggregate, permuted_frobenius=permuted,
                           statistics=statistics)
    scores.info["head"] = head.info
    if check is not None:
        scores.info["label_dependence"] = check
    return scores


class FisherConsumer(BatchConsumer):
    """Fisher diagonal of the shared pass: per-example squared gradients of the log-likelihood.

    Wraps :class:`SquaredGradAccumulator`: ``capture`` hooks the model for the batch, ``consume`` turns
    the logits into the likelihood terms (labels sampled per *global* example index) and runs the
    backward. Sums are fp32 (whatever the autocast dtype); the rank reduction sums them in fp64.
    """

    name = "fisher"
    needs_backward = True
    needs_hidden_states = False
    supports_stability = True

    def __init__(self, ctx: PipelineContext) -> None:
        self.ctx = ctx
        self.opts = options_of(FisherOptions, ctx.config.options)
        self.groups = ctx.config.confidence_groups
        # The head first (a probe fits on cached features of the frozen backbone), then the accumulators.
        self.head = setup_head(ctx.config, self.opts.head, self.opts.probe_examples, ctx.model, ctx.tokenizer,
                               ctx.layer_map, ctx.task, ctx.device, ctx.progress and process_rank() == 0)
        self._share_head()
        if self.opts.save_head and process_rank() == 0:
            save_head(ctx.model, ctx.tokenizer, self.opts.save_head)
        self.fisher = FisherAccumulation(ctx.model, self.opts.fisher, ctx.config.seed, groups=self.groups,
                                         layer_map=ctx.layer_map)
        self.mode, self.acc = self.fisher.mode, self.fisher.acc

    def _share_head(self) -> None:
        """Under torchrun every rank fits the head; rank 0's is the one all ranks score with."""
        if world_size() > 1 and self.head.fits_labels:
            params = dict(self.ctx.model.named_parameters())
            names = self.head.info.get("parameters") or head_parameter_names(self.ctx.model, self.ctx.layer_map)
            broadcast_from_rank0_([params[n].data for n in names] if self.head.info.get("kind") != "warmup"
                                  else [p.data for p in params.values()])

    def pass_hooks(self) -> ContextManager[Any]:
        return self.acc.hooked()

    def capture(self, batch: Mapping[str, Tensor]) -> ContextManager[Any]:
        return self.fisher.capture(batch)

    def consume(self, batch: Mapping[str, Tensor], outputs: Any) -> None:
        self.fisher.consume(batch, outputs)

    def state_dict(self) -> dict:
        # the accumulator's state holds what resuming needs (no all-zero ``sums`` when every batch had groups)
        cpu = lambda d: {n: t.detach().cpu().clone() for n, t in d.items()}  # noqa: E731
        return {k: (cpu(v) if k == "sums" else [cpu(g) for g in v] if k == "group_sums" else v)
                for k, v in self.acc.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.acc.load_state_dict(state)

    def finite_flag(self) -> Tensor | None:
        """0-dim bool tensor: every accumulator is finite (no host sync here).

        The sums are non-negative, so the sum of each is finite exactly when all its elements are (short of a
        total above the float range, itself a broken Fisher): one read of the accumulators, no temporaries;
        far cheaper than ``isfinite(t).all()`` on a CPU.
        """
        totals = [t.sum() for _, t in self.acc.accumulators() if t.is_floating_point()]
        return torch.isfinite(torch.stack(totals)).all() if totals else None

    def zero_(self) -> None:
        for _, t in self.acc.accumulators():
            t.zero_()

    def first_nonfinite(self) -> str | None:
        """The first accumulator (in the model's parameter order) holding NaN/Inf, named, or None."""
        order = {n: i for i, (n, _) in enumerate(self.ctx.model.named_parameters())}
        for n, t in sorted(self.acc.accumulators(), key=lambda item: order.get(item[0], len(order))):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"Fisher accumulator of parameter {n} ({self.ctx.layer_map.describe(n)})"
        return None

    def all_reduce(self, group: Any = None) -> None:
        acc = self.acc
        device = acc.accumulators()[0][1].device
        # [examples, whether the plain sums of the grouped parameters were used]: every rank must reduce the same tensors
        meta = torch.tensor([float(acc.num_examples), float(acc.sums_used and bool(acc.group_sums))], dtype=torch.float64,
                            device=device)
        all_reduce_sum_([meta], group)
        acc.num_examples = int(meta[0].item())
        if meta[1].item() > 0 and not acc.sums_used:
            acc.allocate_plain_sums()  # zeros on this rank: every rank reduces the same tensors
        names = sorted(acc.sums)
        all_reduce_sum_([acc.sums[n] for n in names], group)
        if self.groups:
            grouped = sorted(acc.group_names)
            all_reduce_sum_([g[n] for g in acc.group_sums for n in grouped], group)
            counts = torch.tensor(acc.group_counts, dtype=torch.float64, device=device)
            all_reduce_sum_([counts], group)
            acc.group_counts = [int(c) for c in counts.tolist()]
        fallback = all_gather_objects(sorted(self.acc.fallback_params), group)
        self.acc.fallback_params = set().union(*map(set, fallback))

    def result(self) -> LayerScores:
        cfg, opts = self.ctx.config, self.opts
        result = self.fisher.result(release=True)  # the pass is over: the sums become the diagonal, no copy
        statistics = layer_statistics(result.diagonal, self.ctx.model, self.ctx.layer_map)
        check, permuted = None, None
        if opts.label_check > 0 and self.ctx.corpus is not None:
            check, permuted = self._label_check(statistics[0])
        elif opts.label_check > 0:  # a consumer driven without the streamed pass's corpus (tests, plug-ins)
            if opts.aggregate == "label_specific":
                raise ValueError("fastsel: --aggregate label_specific needs the label-dependence check, which needs the "
                                 "pass's corpus (PipelineContext.corpus)")
            check = {"unavailable": "no corpus to reread (PipelineContext.corpus is None)"}
        scores = fisher_scores(result, self.ctx.model, self.ctx.layer_map, model_name=cfg.model, task=self.ctx.task.name,
                               split=cfg.split, aggregate=opts.aggregate, permuted_frobenius=permuted,
                               statistics=statistics)
        scores.info["head"] = self.head.info
        if check is not None:
            scores.info["label_dependence"] = check
        if self.groups:
            scores.info["ranking_confidence"] = self.confidence(scores)
        return scores

    def _label_check(self, layers: list[dict]) -> tuple[dict, list[float]]:
        """The label-dependence check on a seeded share of the corpus, sharded over the ranks like the pass."""
        ctx, cfg, pcfg = self.ctx, self.ctx.config, self.ctx.pipeline
        corpus = ctx.corpus
        if corpus is None:
            raise ValueError("fastsel: the label-dependence check needs the pass's corpus (PipelineContext.corpus)")
        subset = label_subset(len(corpus), self.opts.label_check, cfg.seed)
        new = permuted_labels(corpus.labels(), subset, cfg.seed)
        schedule = [subset[b] for b in schedule_batches(corpus.lengths()[subset], batch_size=cfg.batch_size,
                                                        max_tokens=pcfg.max_tokens, bucket=pcfg.bucket, seed=cfg.seed)]
        mine = shard_batches(schedule, process_rank(), world_size())

        def batches() -> Iterator[dict[str, Tensor]]:
            for batch in BatchReader(corpus, ctx.tokenizer, mine, prefetch=0):
                batch = {k: v.to(ctx.device) for k, v in batch.items()}
                dtype = batch["labels"].dtype
                batch["labels"] = torch.tensor([new[int(i)] for i in batch["index"].tolist()], dtype=dtype, device=ctx.device)
                yield batch

        def reduce(acc: FisherAccumulation) -> None:
            if world_size() > 1:
                names = sorted(acc.acc.sums)
                all_reduce_sum_([acc.acc.sums[n] for n in names])
                count = torch.tensor([float(acc.acc.num_examples)], dtype=torch.float64, device=ctx.device)
                all_reduce_sum_([count])
                acc.acc.num_examples = int(count.item())

        def autocast() -> ContextManager[Any]:
            return autocast_context(ctx.device, pcfg.autocast)

        return label_dependence(ctx.model, ctx.layer_map, self.mode, cfg.seed, self.head, batches, block_aggregates(layers),
                                self.opts.aggregate, len(subset), self.opts.label_check, reduce, autocast, self._share_head)

    def group_scores(self, groups: list[int], group_sums: list[dict[str, Tensor]] | None = None,
                     group_counts: list[int] | None = None) -> list[float]:
        """Layer scores (by the run's aggregate) of the examples of ``groups`` alone."""
        aggregate = "frobenius" if self.opts.aggregate == "label_specific" else self.opts.aggregate
        return self.fisher.group_scores(groups, self.ctx.layer_map, group_sums, group_counts, aggregate=aggregate)

    def stability_scores(self, active: bool) -> Callable[[list[int]], list[float]]:
        """Mid-pass: scores_of(groups) on the groups so far, reduced over the ranks (copies; this rank's
        accumulators are untouched)."""
        names = sorted(self.acc.group_names)
        sums = [{n: g[n].detach().clone() for n in names} for g in self.acc.group_sums]
        counts = list(self.acc.group_counts)
        if active:
            all_reduce_sum_([g[n] for g in sums for n in names])
            c = torch.tensor(counts, dtype=torch.float64, device=sums[0][names[0]].device)
            all_reduce_sum_([c])
            counts = [int(v) for v in c.tolist()]
        return lambda groups: self.group_scores(groups, sums, counts)

    def confidence(self, scores: LayerScores) -> dict:
        if self.opts.aggregate == "label_specific":
            return {"method": method(self.ctx.confidence_unit), "groups": self.groups,
                    "unavailable": "the label_specific aggregate has no per-group scores (the permuted-label pass is one "
                                   "subset)"}
        return confidence_from_groups([l.score for l in scores.layers], self.group_scores, self.groups, True,
                                      self.ctx.confidence_unit)


register_metric(Metric(name="fisher", run=_fisher_run, consumer=FisherConsumer, options=FisherOptions, higher_is_better=True,
                       default_examples=200))  # diagonal Fisher information per layer (Lodha et al. 2023)
