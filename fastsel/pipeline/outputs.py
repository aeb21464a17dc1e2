"""What both passes do with their results: check that the metrics fit the task, check and annotate the
scores (config, timings, length limit), and write scores.json and the plot (one file per metric when several)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from fastsel.data.specs import TaskSpec
from fastsel.pipeline.checks import check_scores_finite
from fastsel.pipeline.config import ScoreConfig
from fastsel.pipeline.registry import METRICS
from fastsel.scores.layer_scores import LayerScores
from fastsel.scores.plot import plot_layer_scores

__all__ = ["check_metrics_fit_task", "finish_scores", "write_scores", "output_path"]


def check_metrics_fit_task(names: Sequence[str], task: TaskSpec) -> None:
    """One-line error when a metric that needs classes meets a regression task."""
    for name in names:
        if METRICS[name].classification_only and task.is_regression:
            raise ValueError(f"fastsel: metric {name!r} needs classes, but task {task.name!r} is a regression task")


def finish_scores(scores: LayerScores, cfg: ScoreConfig, *, seconds: float, max_length_limit: int | None) -> LayerScores:
    """NonFiniteError for NaN/Inf scores; else record the run's length limit, time and config in ``info``."""
    check_scores_finite(scores)
    scores.info.setdefault("max_length_limit", max_length_limit)
    scores.info.setdefault("seconds", round(seconds, 3))
    scores.info.setdefault("config", json.loads(cfg.to_json()))
    return scores


def output_path(path: str | os.PathLike, metric: str, num_metrics: int) -> Path:
    """``path`` itself for one metric; ``scores.json`` -> ``scores.fisher.json`` for several."""
    path = Path(path)
    return path if num_metrics == 1 else path.with_name(f"{path.stem}.{metric}{path.suffix}")


def write_scores(scores: Mapping[str, LayerScores], out: str | os.PathLike | None, plot: str | os.PathLike | None) -> None:
    """scores.json and the metric's plot of every metric (``output_path`` names them when there are several)."""
    for name, s in scores.items():
        if out:
            s.to_json(output_path(out, name, len(scores)))
        if plot:
            (METRICS[name].plot or plot_layer_scores)(s, output_path(plot, name, len(scores)))
