"""The in-memory scoring job: load a task's examples and the model, run one metric's ``run(ctx)``."""
from __future__ import annotations

import time
from pathlib import Path

from fastsel.data.features import tokenize_examples
from fastsel.data.readers import examples_for
from fastsel.hf.loading import load_model
from fastsel.pipeline.checks import apply_length_limit, check_weights_finite
from fastsel.pipeline.config import ScoreConfig
from fastsel.pipeline.context import ScoringContext
from fastsel.pipeline.outputs import check_metrics_fit_task, finish_scores, write_scores
from fastsel.pipeline.registry import METRICS
from fastsel.scores.layer_scores import LayerScores

__all__ = ["prepare", "run_scoring"]


def prepare(cfg: ScoreConfig, *, progress: bool = True) -> ScoringContext:
    """Load data first (cheap, fails fast on bad input), then the model with a head sized for the task."""
    examples = examples_for(cfg)
    if len(examples) == 0:
        raise ValueError(f"fastsel: no examples in {cfg.task}/{cfg.split}")
    task = examples.task
    check_metrics_fit_task(cfg.metric.split(","), task)
    num_labels = 1 if task.is_regression else task.num_labels
    limit = apply_length_limit(cfg)
    model, tokenizer, layer_map = load_model(cfg.model, num_labels=num_labels, seed=cfg.seed, device=cfg.device)
    check_weights_finite(model, layer_map, cfg.model)
    features = tokenize_examples(examples, tokenizer, cfg.max_length)
    return ScoringContext(cfg, model, tokenizer, layer_map, task, examples, features, progress, limit)


def run_scoring(cfg: ScoreConfig, *, out: str | Path | None = None, plot: str | Path | None = None, progress: bool = True) -> LayerScores:
    """Run one metric (``cfg.metric``) and write scores.json / the PNG plot when paths are given."""
    ctx = prepare(cfg, progress=progress)
    metric = METRICS[cfg.metric]
    start = time.perf_counter()
    scores = finish_scores(metric.run(ctx), cfg, seconds=time.perf_counter() - start, max_length_limit=ctx.max_length_limit)
    write_scores({cfg.metric: scores}, out, plot)
    return scores
