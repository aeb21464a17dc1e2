"""Alternatives to the variability ratio (Xie et al. 2022, section 4.3, appendix C.7) and layer probing.

- CCA score: regularised canonical correlations between pooled states h (N, D) and one-hot labels
  (N, C), regularisation (eps_h, eps_y) chosen by cross-validation on a development fold and scored on
  a held-out test fold; the score is the mean of the first J - 1 test correlations, J = min(D, C)
  (the last one is noise: the centred one-hot vectors have rank C - 1). Higher is better.
- Numerical rank rho = (1/C) sum_y ||H_y||_*^2 / ||H_y||_F^2 (Zhou et al. 2022). Lower is better.
- Probes: a logistic-regression head on each layer's frozen pooled states of the scored (train)
  examples, evaluated on the task's validation split with the task's metric (MCC for CoLA, F1 for
  MRPC/QQP, accuracy otherwise), and rho(score, s): Pearson and Spearman correlation over the blocks.

These metrics keep the pooled states of the scored subset in memory (N x D per layer, small); only
the variability ratio is streaming.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastsel.capture.taps import POOLINGS, PooledStates, layer_taps, pool_mask
from fastsel.data.task_metrics import TASK_METRICS
from fastsel.hf.io import eval_mode, model_inputs
from fastsel.hf.layer_map import LayerMap
from fastsel.utils.progress import progress_bar

__all__ = ["collect_pooled_states", "cca_score", "cca_correlations", "numerical_rank", "probe_scores", "PROBE_METRICS",
           "layer_correlation"]


CCA_EPS_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # relative to the mean variance of each view


def collect_pooled_states(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    layer_map: LayerMap,
    *,
    pooling: str = "mean",
    device: torch.device | str | None = None,
    total: int | None = None,
    progress: bool = False,
    desc: str = "pooled states",
) -> tuple[list[np.ndarray], np.ndarray]:
    """([states (N, D) float64 per layer index: 0 = embeddings, l + 1 = block l], labels (N,)).

    Examples without any pooled token are dropped (as in the variability statistics)."""
    if pooling not in POOLINGS:
        raise ValueError(f"fastsel: unknown pooling {pooling!r}; choose from {POOLINGS}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    keep = PooledStates()
    current: dict[str, Tensor] = {}

    def consume(index: int, hidden: Tensor) -> None:
        keep(index, hidden, current["mask"], current.get("labels"))

    with eval_mode(model):
        with progress_bar(total=total, desc=desc, unit="ex", disable=not progress) as bar, \
                layer_taps(model, layer_map, consume), torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                current["mask"] = pool_mask(batch, pooling)
                if "labels" in batch:
                    current["labels"] = batch["labels"]
                model(**model_inputs(batch))
                bar.update(int(batch["input_ids"].shape[0]))
    return keep.result()


def _check_labels(labels: np.ndarray, num_classes: int, what: str, min_per_class: int = 2) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise ValueError(f"fastsel: {what} needs class labels, got real-valued (regression) labels")
    labels = labels.astype(np.int64)
    if num_classes < 2:
        raise ValueError(f"fastsel: {what} needs at least 2 classes, got {num_classes}")
    counts = np.bincount(labels, minlength=num_classes)
    if (counts < min_per_class).any():
        raise ValueError(f"fastsel: {what} needs at least {min_per_class} examples per class; class counts are {counts.tolist()}")
    return labels


def _inv_sqrt(evals: np.ndarray, evecs: np.ndarray, eps: float) -> np.ndarray:
    return (evecs / np.sqrt(np.clip(evals, 0, None) + eps)) @ evecs.T


def _corr_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1), 0.0)


class _CCAFit:
    """Centred covariances of a training set, ready to be regularised with any (eps_h, eps_y)."""

    def __init__(self, X: np.ndarray, Y: np.ndarray) -> None:
        self.mx, self.my = X.mean(0), Y.mean(0)
        Xc, Yc = X - self.mx, Y - self.my
        n = max(1, X.shape[0] - 1)
        cxx, cyy = Xc.T @ Xc / n, Yc.T @ Yc / n
        self.cxy = Xc.T @ Yc / n
        self.ex, self.vx = np.linalg.eigh(cxx)
        self.ey, self.vy = np.linalg.eigh(cyy)
        self.sx = max(np.trace(cxx) / cxx.shape[0], 1e-300)  # regularisation is relative: scale invariant
        self.sy = max(np.trace(cyy) / cyy.shape[0], 1e-300)

    def directions(self, eps_h: float, eps_y: float, J: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wx = _inv_sqrt(self.ex, self.vx, eps_h * self.sx)
        wy = _inv_sqrt(self.ey, self.vy, eps_y * self.sy)
        u, s, vt = np.linalg.svd(wx @ self.cxy @ wy, full_matrices=False)
        return wx @ u[:, :J], wy @ vt.T[:, :J], s[:J]

    def test_correlations(self, X: np.ndarray, Y: np.ndarray, eps_h: float, eps_y: float, J: int) -> np.ndarray:
        v, w, _ = self.directions(eps_h, eps_y, J)
        return _corr_columns((X - self.mx) @ v, (Y - self.my) @ w)


def cca_correlations(X: np.ndarray, Y: np.ndarray, eps_h: float = 0.0, eps_y: float = 0.0) -> np.ndarray:
    """Canonical correlations (descending, J = min(D_x, D_y)) of X (N, Dx) and Y (N, Dy), with ridge
    eps * (mean variance) added to each auto-covariance (eps = 0: plain CCA)."""
    J = min(X.shape[1], Y.shape[1])
    return _CCAFit(np.asarray(X, np.float64), np.asarray(Y, np.float64)).directions(eps_h, eps_y, J)[2]


def _cca_summary(corr: np.ndarray) -> float:
    k = max(1, corr.shape[0] - 1)  # all but the last (noise) correlation
    return float(np.mean(corr[:k]))


def cca_score(
    states: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    folds: int = 10,
    eps_grid: Sequence[float] = CCA_EPS_GRID,
    seed: int = 0,
) -> dict[str, Any]:
    """Cross-validated regularised CCA score between states (N, D) and one-hot labels (appendix C.7).

    Stratified ``folds``-fold split; in rotation r, fold r is the test set, fold r + 1 the development
    set, the others the training set: (eps_h, eps_y) maximising the development score are used on the
    test fold. Returns the mean test score over rotations and the chosen eps pairs."""
    from sklearn.model_selection import StratifiedKFold

    labels = _check_labels(labels, num_classes, "the CCA score", min_per_class=folds)
    X = np.asarray(states, np.float64)
    Y = np.eye(num_classes)[labels]
    J = min(X.shape[1], num_classes)
    fold_of = np.empty(len(labels), dtype=np.int64)
    for k, (_, idx) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, labels)):
        fold_of[idx] = k
    tests, chosen = [], []
    for r in range(folds):
        test, dev = fold_of == r, fold_of == (r + 1) % folds
        train = ~(test | dev)
        fit = _CCAFit(X[train], Y[train])
        best = max(((eh, ey) for eh in eps_grid for ey in eps_grid[::2]),
                   key=lambda e: _cca_summary(fit.test_correlations(X[dev], Y[dev], e[0], e[1], J)))
        tests.append(_cca_summary(fit.test_correlations(X[test], Y[test], best[0], best[1], J)))
        chosen.append(list(best))
    return {"score": float(np.mean(tests)), "std": float(np.std(tests)), "eps": chosen}


def numerical_rank(states: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """(1/C) sum_y ||H_y||_*^2 / ||H_y||_F^2 over the classes' state matrices H_y (n_y, D) (section 4.3)."""
    labels = _check_labels(labels, num_classes, "the numerical rank", min_per_class=1)
    total = 0.0
    for y in range(num_classes):
        s = np.linalg.svd(np.asarray(states, np.float64)[labels == y], compute_uv=False)
        total += float(s.sum() ** 2 / np.square(s).sum()) if s.size and s.any() else 0.0
    return total / num_classes


# The task metrics are fastsel.data.task_metrics' (numpy, the official GLUE definitions, tested against scikit-learn):
# F1 is the binary F1 of class 1, as for every task that reports F1 (MRPC, QQP, MultiRC); a probe on a task
# without F1 is scored by accuracy.
PROBE_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    name: TASK_METRICS[name] for name in ("accuracy", "f1", "mcc")
}


def probe_scores(
    train_states: Sequence[np.ndarray],
    train_labels: np.ndarray,
    eval_states: Sequence[np.ndarray],
    eval_labels: np.ndarray,
    *,
    metric: str = "accuracy",
    C: float = 1.0,
    max_iter: int = 2000,
    seed: int = 0,
) -> list[float]:
    """Probe score per layer: standardised logistic regression on train_states[i] (N, D), ``metric`` of
    its predictions on eval_states[i] (M, D)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if metric not in PROBE_METRICS:
        raise ValueError(f"fastsel: unknown probe metric {metric!r}; choose from {sorted(PROBE_METRICS)}")
    train_labels = np.asarray(train_labels).astype(np.int64)
    if len(np.unique(train_labels)) < 2:
        raise ValueError("fastsel: probing needs at least 2 classes in the training examples")
    out = []
    for Xtr, Xev in zip(train_states, eval_states):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
        clf.fit(Xtr, train_labels)
        out.append(PROBE_METRICS[metric](clf.predict(Xev), np.asarray(eval_labels).astype(np.int64)))  # (pred, gold)
    return out


def layer_correlation(a: Sequence[float], b: Sequence[float]) -> dict[str, float | None]:
    """Pearson and Spearman correlation of two per-layer curves (None when either is constant)."""
    from scipy.stats import pearsonr, spearmanr

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return {"pearson": None, "spearman": None}
    return {"pearson": float(pearsonr(a, b)[0]), "spearman": float(spearmanr(a, b)[0])}
