"""The probing metrics (cca, numrank, probe) and ``--probe`` for any metric."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastsel.capture.taps import POOLINGS
from fastsel.data.features import make_dataloader, tokenize_examples
from fastsel.data.readers import load_examples
from fastsel.pipeline.context import ScoringContext
from fastsel.pipeline.registry import Metric, options_of, register_metric
from fastsel.scores.layer_scores import LayerScore, LayerScores
from fastsel.scores.plot import plot_layer_curves
from fastsel.scores.probing import (
    PROBE_METRICS,
    cca_score,
    collect_pooled_states,
    layer_correlation,
    numerical_rank,
    probe_scores,
)
from fastsel.utils.settings import setting

__all__ = ["PoolingOptions", "ProbeOptions", "CCAOptions", "NumrankOptions", "attach_probes"]


@dataclass(frozen=True)
class PoolingOptions:
    pooling: str = setting("mean", "sequence state: mean of the non-special tokens, or the first (CLS) token (variability, "
                          "cca, numrank, probe)", choices=POOLINGS)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"fastsel: unknown pooling {self.pooling!r}; choose from {POOLINGS}")


@dataclass(frozen=True)
class ProbeOptions(PoolingOptions):
    probe_eval_examples: int | None = setting(None, "random subset of the validation split (default: all)", type=int)
    probe_c: float = setting(1.0, "inverse L2 strength of the logistic-regression probes")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.probe_c, (int, float)) and 0 < self.probe_c < float("inf")):
            raise ValueError(f"fastsel: --probe-c must be a finite number > 0 (the inverse L2 strength; larger: weaker "
                             f"regularisation), got {self.probe_c}")
        if self.probe_eval_examples is not None and self.probe_eval_examples < 2:
            raise ValueError(f"fastsel: --probe-eval-examples must be >= 2 (leave it out for all the validation split), "
                             f"got {self.probe_eval_examples}")


@dataclass(frozen=True)
class NumrankOptions(ProbeOptions):
    probe: bool = setting(False, "also train a probe per layer and report the probe score s and rho(score, s) (see "
                         "--metric probe options)")


@dataclass(frozen=True)
class CCAOptions(NumrankOptions):
    cca_folds: int = setting(10, "cross-validation folds of the CCA score (appendix C.7)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.cca_folds, int) or self.cca_folds < 2:
            raise ValueError(f"fastsel: --cca-folds must be an integer >= 2 (cross-validation folds; at most the number "
                             f"of examples), got {self.cca_folds}")


def _pooling(ctx: ScoringContext) -> str:
    return options_of(PoolingOptions, ctx.config.options).pooling


def _probe_metric(ctx: ScoringContext) -> str:
    """The task's main metric if a probe can report it (accuracy, F1, MCC), else accuracy."""
    return ctx.task.metrics[0] if ctx.task.metrics and ctx.task.metrics[0] in PROBE_METRICS else "accuracy"


def _probes(ctx: ScoringContext, tr, ev, metric: str) -> list[float]:
    return probe_scores(tr[0], tr[1], ev[0], ev[1], metric=metric, C=options_of(ProbeOptions, ctx.config.options).probe_c,
                        seed=ctx.config.seed)


def _train_states(ctx: ScoringContext) -> tuple[list[np.ndarray], np.ndarray]:
    return collect_pooled_states(ctx.model, ctx.loader(), ctx.layer_map, pooling=_pooling(ctx), total=len(ctx.features),
                                 progress=ctx.progress, desc=f"pooled states ({_pooling(ctx)})")


def _eval_states(ctx: ScoringContext, train: tuple[list[np.ndarray], np.ndarray]) -> tuple[tuple, tuple, str]:
    """(train states, eval states, where): the task's validation split, or a stratified 20% hold-out of
    the scored examples for custom data (which has no validation split)."""

    cfg = ctx.config
    if ctx.task.benchmark == "custom" or cfg.split == "validation":
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(train[1]))
        tr, ev = train_test_split(idx, test_size=0.2, random_state=cfg.seed, stratify=train[1])
        pick = lambda s, i: ([x[i] for x in s[0]], s[1][i])  # noqa: E731
        return pick(train, tr), pick(train, ev), "20% hold-out of the scored examples"
    n_eval = options_of(ProbeOptions, cfg.options).probe_eval_examples
    examples = load_examples(ctx.task.name, cfg.data_dir, "validation", num_examples=n_eval, seed=cfg.seed)
    features = tokenize_examples(examples, ctx.tokenizer, cfg.max_length)
    loader = make_dataloader(features, ctx.tokenizer, cfg.batch_size)
    ev = collect_pooled_states(ctx.model, loader, ctx.layer_map, pooling=_pooling(ctx), total=len(features),
                               progress=ctx.progress, desc="pooled states (validation)")
    return train, ev, f"validation split ({len(features)} examples)"


def attach_probes(ctx: ScoringContext, scores: LayerScores, train: tuple[list[np.ndarray], np.ndarray] | None = None) -> None:
    """Train a probe per layer; add values["probe"] to every block, the embedding output's probe score to
    extra["embeddings"], and info probe_metric / probe_eval / rho_probe = rho(score, s) over the blocks."""
    train = train if train is not None else _train_states(ctx)
    tr, ev, where = _eval_states(ctx, train)
    metric = _probe_metric(ctx)
    s = _probes(ctx, tr, ev, metric)
    for layer in scores.layers:
        layer.values["probe"] = s[layer.layer + 1]
    scores.extra.setdefault("embeddings", {})["probe"] = s[0]
    scores.info["probe_metric"] = metric
    scores.info["probe_eval"] = where
    scores.info["probe_train_examples"] = int(len(tr[1]))
    scores.info["rho_probe"] = layer_correlation([l.score for l in scores.layers], s[1:])


def _layer_scores(ctx: ScoringContext, metric: str, values: list[float], higher_is_better: bool, per_layer: list[dict] | None = None, **info):

    per_layer = per_layer or [{} for _ in values]
    layers = [LayerScore(l, ctx.layer_map.block_name(l), values[l + 1], values=dict(per_layer[l + 1]))
              for l in range(len(values) - 1)]
    scores = ctx.scores(metric, layers, mode=_pooling(ctx), higher_is_better=higher_is_better,
                        extra={"embeddings": {"score": values[0], **per_layer[0]}}, info=dict(info))
    scores.info["best_layer"] = scores.ranking[0]
    return scores


def _cca_run(ctx: ScoringContext):
    train = _train_states(ctx)
    folds = options_of(CCAOptions, ctx.config.options).cca_folds
    res = [cca_score(x, train[1], ctx.task.num_labels, folds=folds, seed=ctx.config.seed) for x in train[0]]
    scores = _layer_scores(ctx, "cca", [r["score"] for r in res], True,
                           [{"cca_std": r["std"]} for r in res], cca_folds=folds)
    if options_of(NumrankOptions, ctx.config.options).probe:
        attach_probes(ctx, scores, train)
    return scores


def _numrank_run(ctx: ScoringContext):
    train = _train_states(ctx)
    vals = [numerical_rank(x, train[1], ctx.task.num_labels) for x in train[0]]
    scores = _layer_scores(ctx, "numrank", vals, False)
    if options_of(NumrankOptions, ctx.config.options).probe:
        attach_probes(ctx, scores, train)
    return scores


def _probe_run(ctx: ScoringContext):
    train = _train_states(ctx)
    tr, ev, where = _eval_states(ctx, train)
    metric = _probe_metric(ctx)
    s = _probes(ctx, tr, ev, metric)
    return _layer_scores(ctx, "probe", s, True, probe_metric=metric, probe_eval=where, probe_train_examples=int(len(tr[1])))


# cca: cross-validated regularised CCA between pooled states and one-hot labels; numrank: numerical rank
# ||H_y||_*^2 / ||H_y||_F^2 averaged over classes; probe: logistic-regression probe per layer, scored on the
# validation split
for _name, _run, _hib, _options in [
    ("cca", _cca_run, True, CCAOptions),
    ("numrank", _numrank_run, False, NumrankOptions),
    ("probe", _probe_run, True, ProbeOptions),
]:
    register_metric(Metric(name=_name, run=_run, higher_is_better=_hib, classification_only=True,
                           options=_options, plot=plot_layer_curves, default_examples=2000))
