"""Official GLUE/SuperGLUE metrics: MCC (CoLA), F1 and accuracy (MRPC, QQP), Pearson/Spearman (STS-B), accuracy.

Plain numpy, tested against scikit-learn and scipy. Which metrics a task reports, and which one picks the
best epoch (the first), comes from ``TaskSpec.metrics`` in :mod:`fastsel.data`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from fastsel.data.specs import get_task

__all__ = ["TASK_METRICS", "accuracy", "f1_binary", "matthews_corrcoef", "pearson", "spearman", "task_metrics",
           "predictions_from_logits", "main_metric"]


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def f1_binary(pred: np.ndarray, gold: np.ndarray) -> float:
    """F1 of the positive class (label 1); 0 when there are no predicted and no gold positives."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp = float(np.sum((pred == 1) & (gold == 1)))
    fp = float(np.sum((pred == 1) & (gold != 1)))
    fn = float(np.sum((pred != 1) & (gold == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(pred: np.ndarray, gold: np.ndarray) -> float:
    """Multiclass MCC (Gorodkin's R_K, as sklearn); 0 when undefined (a constant prediction)."""
    pred, gold = np.asarray(pred).astype(np.int64), np.asarray(gold).astype(np.int64)
    k = int(max(pred.max(initial=0), gold.max(initial=0))) + 1
    c = np.zeros((k, k), dtype=np.float64)
    np.add.at(c, (gold, pred), 1.0)
    t, p, n = c.sum(1), c.sum(0), c.sum()
    cov_tp = np.trace(c) * n - t @ p
    denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return 0.0 if denom == 0 else float(cov_tp / denom)


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    x, y = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return 0.0 if denom == 0 else float((x * y).sum() / denom)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):  # ties share the mean of their ranks
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    return pearson(_average_ranks(np.asarray(pred, dtype=np.float64)), _average_ranks(np.asarray(gold, dtype=np.float64)))


TASK_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def predictions_from_logits(logits: np.ndarray, regression: bool) -> np.ndarray:
    """(N, C) logits -> (N,) class ids, or (N, 1) outputs -> (N,) real values for regression."""
    logits = np.asarray(logits)
    return logits.reshape(len(logits), -1)[:, 0] if regression else logits.argmax(-1)


def task_metrics(task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{metric: value} for the task's official metrics (``task.metrics``, a TaskSpec or a task name)."""

    spec = get_task(task)
    if len(labels) == 0:
        raise ValueError("fastsel: no examples to evaluate")
    return {name: TASK_METRICS[name](predictions, labels) for name in spec.metrics}


def main_metric(task) -> str:

    return get_task(task).metrics[0]
