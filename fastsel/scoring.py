"""Layer scoring end to end: config, metric registry, and the job behind ``fastsel score``.

A metric is registered once with :func:`register_metric`; the CLI builds its ``--metric`` choices and
metric-specific flags from the registry, so adding a metric touches no if/else chain.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from torch import nn

from fastsel.data import Examples, TaskSpec, get_task, load_custom_examples, load_examples, make_dataloader, tokenize_examples
from fastsel.layers import LayerMap
from fastsel.models import load_model
from fastsel.scores import LayerScores

__all__ = ["ScoreConfig", "Metric", "METRICS", "register_metric", "ScoringContext", "prepare", "run_scoring",
           "apply_length_limit", "NonFiniteError", "check_scores_finite"]


class NonFiniteError(ValueError):
    """NaN/Inf met in the loss, the logits, the statistics or the accumulators: no scores are written."""


def apply_length_limit(cfg: "ScoreConfig") -> int | None:
    """Clamp ``cfg.max_length`` (in place) to the longest input the model can take; returns that limit.

    A one-line note (rank 0 only) says when it clamps. None when the model's config gives no limit or
    cannot be read here (loading the model then reports that).
    """
    import os

    from transformers import AutoConfig

    from fastsel.models import _quiet_transformers, max_sequence_length, resolve_model_path

    path = resolve_model_path(cfg.model)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(path, local_files_only=Path(path).is_dir())
    except (OSError, ValueError, KeyError):
        return None
    limit = max_sequence_length(config)
    if limit is not None and cfg.max_length > limit:
        if int(os.environ.get("RANK", "0")) == 0:
            import sys

            print(f"fastsel: note: --max-length {cfg.max_length} is more than {cfg.model} can take; "
                  f"using its limit, {limit} tokens", file=sys.stderr)
        cfg.max_length = limit
    return limit


def _check_weights_finite(model: nn.Module, layer_map: LayerMap, name: str) -> None:
    """NonFiniteError naming the first parameter holding NaN/Inf (a broken checkpoint), before any pass."""
    import torch

    for pname, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            group = layer_map.group_of(pname)
            raise NonFiniteError(
                f"fastsel: parameter {pname} ({group.replace('layer.', 'block ')}) of {name} holds NaN/Inf: the model's "
                "weights are broken; no scores written (reload or re-download the checkpoint)")


def check_scores_finite(scores: LayerScores) -> None:
    """NonFiniteError naming the first layer whose score or trace is NaN/Inf (before anything is written)."""
    import math

    entries = [(f"layer {l.layer} ({l.name})", {"score": l.score, "trace": l.trace}) for l in scores.layers]
    entries += [(str(name), d) for name, d in scores.extra.items() if isinstance(d, dict)]
    for where, d in entries:
        for key in ("score", "trace"):
            value = d.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise NonFiniteError(
                    f"fastsel: the {scores.metric} {key} of {where} is {value}: "
                    "non-finite values in the model or its statistics; no scores written (check the model's "
                    "weights; run in fp32, or with --autocast bf16 instead of fp16)")


@dataclass
class ScoreConfig:
    """Everything a scoring run needs; validated on construction, round-trips through JSON."""

    metric: str = "fisher"
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    task: str = "sst2"
    data_dir: str | None = None
    split: str = "train"
    num_examples: int | None = None
    balanced: bool = False
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    device: str = "cpu"
    # custom data (task "custom"): a CSV/TSV/JSONL file with named columns
    data_file: str | None = None
    text_fields: tuple[str, ...] = ()
    label_field: str = "label"
    regression: bool = False
    # metric-specific options (e.g. {"fisher": "exact"}, {"pooling": "cls"})
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.text_fields = tuple(self.text_fields)
        self.validate()

    def validate(self) -> None:
        for name in self.metric.split(","):
            if name not in METRICS:
                raise ValueError(f"fastsel: unknown metric {name!r}; choose from {sorted(METRICS)}")
        if self.batch_size < 1:
            raise ValueError(f"fastsel: batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"fastsel: seed must be in 0..2**63-1, got {self.seed}")
        if self.max_length < 2:
            raise ValueError(f"fastsel: max_length must be >= 2, got {self.max_length}")
        k = self.options.get("confidence_groups", 4)
        if not isinstance(k, int) or isinstance(k, bool) or not (k == 0 or k >= 2):
            raise ValueError(f"fastsel: confidence_groups (--confidence-groups) must be 0 (off) or an integer >= 2, got {k!r}")
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(f"fastsel: num_examples must be >= 1, got {self.num_examples}")
        if self.task == "custom":
            if not self.data_file or not self.text_fields:
                raise ValueError("fastsel: task 'custom' needs data_file and text_fields (--data-file, --text-fields)")
        else:
            get_task(self.task)  # raises for an unknown task

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ScoreConfig":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"fastsel: unknown ScoreConfig keys {sorted(unknown)}")
        return cls(**data)


@dataclass
class ScoringContext:
    """What a metric gets: the loaded model and tokenised data of one ScoreConfig."""

    config: ScoreConfig
    model: nn.Module
    tokenizer: Any
    layer_map: LayerMap
    task: TaskSpec
    examples: Examples
    features: list[dict[str, list[int]]]
    progress: bool = True
    max_length_limit: int | None = None  # the model's longest input (``--max-length`` is clamped to it)

    def loader(self, batch_size: int | None = None, shuffle: bool = False):
        return make_dataloader(self.features, self.tokenizer, batch_size or self.config.batch_size, shuffle=shuffle, seed=self.config.seed)

    def scores(self, metric: str, layers: list, **kw: Any) -> LayerScores:
        return LayerScores(
            metric=metric,
            model=self.config.model,
            task=self.task.name,
            split=self.config.split,
            num_examples=len(self.features),
            layers=layers,
            **kw,
        )


@dataclass(frozen=True)
class Metric:
    """A layer-scoring metric: ``run(ctx) -> LayerScores``; ``add_arguments`` adds its own CLI flags,
    whose values land in ``ScoreConfig.options`` under their dest names."""

    name: str
    run: Callable[[ScoringContext], LayerScores]
    higher_is_better: bool = True
    needs_labels: bool = True
    classification_only: bool = False
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    help: str = ""
    plot: Callable[[LayerScores, str | Path], None] | None = None  # None: fastsel.plot.plot_layer_scores


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    if metric.name in METRICS:
        raise ValueError(f"fastsel: metric {metric.name!r} registered twice")
    METRICS[metric.name] = metric
    return metric


def _load_examples(cfg: ScoreConfig) -> Examples:
    if cfg.task == "custom":
        return load_custom_examples(
            cfg.data_file,  # type: ignore[arg-type]
            cfg.text_fields,
            cfg.label_field,
            regression=cfg.regression,
            num_examples=cfg.num_examples,
            seed=cfg.seed,
            balanced=cfg.balanced,
        )
    return load_examples(cfg.task, cfg.data_dir, cfg.split, num_examples=cfg.num_examples, seed=cfg.seed, balanced=cfg.balanced)


def prepare(cfg: ScoreConfig, *, progress: bool = True) -> ScoringContext:
    """Load data first (cheap, fails fast on bad input), then the model with a head sized for the task."""
    examples = _load_examples(cfg)
    if len(examples) == 0:
        raise ValueError(f"fastsel: no examples in {cfg.task}/{cfg.split}")
    task = examples.task
    for name in cfg.metric.split(","):
        metric = METRICS[name]
        if metric.classification_only and task.is_regression:
            raise ValueError(f"fastsel: metric {name!r} needs classes, but task {task.name!r} is a regression task")
    num_labels = 1 if task.is_regression else task.num_labels
    limit = apply_length_limit(cfg)
    model, tokenizer, layer_map = load_model(cfg.model, num_labels=num_labels, seed=cfg.seed, device=cfg.device)
    _check_weights_finite(model, layer_map, cfg.model)
    features = tokenize_examples(examples, tokenizer, cfg.max_length)
    return ScoringContext(cfg, model, tokenizer, layer_map, task, examples, features, progress, limit)


def run_scoring(cfg: ScoreConfig, *, out: str | Path | None = None, plot: str | Path | None = None, progress: bool = True) -> LayerScores:
    """Run one metric (``cfg.metric``) and write scores.json / the PNG plot when paths are given."""
    ctx = prepare(cfg, progress=progress)
    metric = METRICS[cfg.metric]
    start = time.perf_counter()
    scores = metric.run(ctx)
    check_scores_finite(scores)
    scores.info.setdefault("seconds", round(time.perf_counter() - start, 3))
    scores.info.setdefault("config", json.loads(cfg.to_json()))
    scores.info.setdefault("max_length_limit", ctx.max_length_limit)
    if out:
        scores.to_json(out)
    if plot:
        from fastsel.plot import plot_layer_scores

        (metric.plot or plot_layer_scores)(scores, plot)
    return scores


# --------------------------------------------------------------------------------------------------
# Fisher
# --------------------------------------------------------------------------------------------------


def _fisher_run(ctx: ScoringContext) -> LayerScores:
    from fastsel.fisher import fisher_layer_scores

    mode = ctx.config.options.get("fisher", "empirical")
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


def _fisher_args(p: argparse.ArgumentParser) -> None:
    from fastsel.fisher import FISHER_MODES

    p.add_argument("--fisher", choices=FISHER_MODES, default="empirical",
                   help="labels of the log-likelihood: gold (empirical), sampled from the model, or the exact expectation")


register_metric(
    Metric(
        name="fisher",
        run=_fisher_run,
        higher_is_better=True,
        needs_labels=True,
        add_arguments=_fisher_args,
        help="diagonal Fisher information per layer (Lodha et al. 2023)",
    )
)


# Metrics defined in their own modules register themselves on import.
import fastsel.variability  # noqa: E402,F401
import fastsel.probing  # noqa: E402,F401
