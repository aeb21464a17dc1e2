"""CCA score, numerical rank, probes and layer correlations vs independent numpy / scikit-learn."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastsel.scores.probing import PROBE_METRICS, cca_correlations, cca_score, layer_correlation, numerical_rank, probe_scores


def blobs(counts=(60, 60, 60), D=8, sep=2.0, seed=0):
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(size=D) * sep + rng.normal(size=(n, D)) for n in counts])
    y = np.concatenate([[c] * n for c, n in enumerate(counts)])
    return X, y


def test_numerical_rank_matches_norms():
    X, y = blobs((30, 20), D=5)
    expected = np.mean([np.linalg.norm(X[y == c], "nuc") ** 2 / np.linalg.norm(X[y == c], "fro") ** 2 for c in (0, 1)])
    assert numerical_rank(X, y, 2) == pytest.approx(expected)
    # collapsed classes (rank 1) have rho = 1
    Z = np.outer(np.arange(1, 11), np.ones(4))
    assert numerical_rank(np.concatenate([Z, 2 * Z]), np.array([0] * 10 + [1] * 10), 2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="class counts"):
        numerical_rank(X, np.zeros(len(y), int), 2)


def test_cca_correlations_match_sklearn():
    from sklearn.cross_decomposition import CCA

    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 4))
    Y = np.c_[X[:, 0] + 0.5 * rng.normal(size=400), X[:, 1] - X[:, 2] + rng.normal(size=400), rng.normal(size=400)]
    ours = cca_correlations(X, Y)
    cca = CCA(n_components=3, max_iter=5000, tol=1e-10).fit(X, Y)
    u, v = cca.transform(X, Y)
    theirs = [abs(np.corrcoef(u[:, j], v[:, j])[0, 1]) for j in range(3)]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # and the textbook closed form: singular values of Cxx^-1/2 Cxy Cyy^-1/2
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    isq = lambda A: np.linalg.inv(np.linalg.cholesky(A))  # noqa: E731  (a whitening transform)
    s = np.linalg.svd(isq(Xc.T @ Xc) @ Xc.T @ Yc @ isq(Yc.T @ Yc).T, compute_uv=False)
    np.testing.assert_allclose(ours, s[:3], atol=1e-10)


def test_cca_score_orders_informative_above_noise():
    X, y = blobs((80, 80, 80), D=6, sep=1.5, seed=2)
    noise = np.random.default_rng(3).normal(size=X.shape)
    good = cca_score(X, y, 3, folds=5)
    bad = cca_score(noise, y, 3, folds=5)
    assert 0 < good["score"] <= 1 and good["score"] > bad["score"] + 0.3
    assert len(good["eps"]) == 5
    assert cca_score(X, y, 3, folds=5) == good  # deterministic
    assert cca_score(10 * X + 3, y, 3, folds=5)["score"] == pytest.approx(good["score"], rel=1e-6)  # scale invariant
    with pytest.raises(ValueError, match="class counts"):
        cca_score(X[:12], y[:12], 3, folds=5)


def test_task_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert PROBE_METRICS["accuracy"](y, p) == pytest.approx(accuracy_score(y, p))
    assert PROBE_METRICS["f1"](y, p) == pytest.approx(f1_score(y, p))
    assert PROBE_METRICS["mcc"](y, p) == pytest.approx(matthews_corrcoef(y, p))


def test_probe_scores_separable_vs_noise():
    X, y = blobs((60, 60), D=5, sep=4.0, seed=4)
    Xe, ye = blobs((30, 30), D=5, sep=4.0, seed=4)
    rng = np.random.default_rng(5)
    s = probe_scores([X, rng.normal(size=X.shape)], y, [Xe, rng.normal(size=Xe.shape)], ye, metric="accuracy")
    assert s[0] > 0.95 and s[1] < 0.8
    with pytest.raises(ValueError, match="unknown probe metric"):
        probe_scores([X], y, [Xe], ye, metric="auc")
    with pytest.raises(ValueError, match="2 classes"):
        probe_scores([X], np.zeros_like(y), [Xe], ye)


def test_layer_correlation():
    r = layer_correlation([3, 2, 1, 1.5], [0.5, 0.6, 0.9, 0.7])
    assert r["pearson"] < -0.9 and r["spearman"] == pytest.approx(-1.0)
    assert layer_correlation([1, 1, 1], [1, 2, 3]) == {"pearson": None, "spearman": None}


@pytest.mark.slow
@pytest.mark.parametrize("metric,extra", [("cca", ["--cca-folds", "3"]), ("numrank", []), ("probe", ["--probe-eval-examples", "40"])])
def test_cli_alternatives_minilm(metric, extra, data_dir, minilm_path, tmp_path):
    from fastsel.cli.app import main

    out = tmp_path / "s.json"
    args = ["score", "--metric", metric, "--model", str(minilm_path), "--task", "mrpc", "--data-dir", str(data_dir),
            "--num-examples", "60", "--max-length", "32", "--batch-size", "20", "--balanced", "--no-progress",
            "--out", str(out), "--plot", str(tmp_path / "p.png"), *extra]
    assert main(args) == 0
    d = json.loads(out.read_text())
    assert d["metric"] == metric and len(d["layers"]) == 6 and "embeddings" in d["extra"]
    assert d["higher_is_better"] == (metric != "numrank")
    if metric == "probe":
        assert d["probe_metric"] == "f1" and all(0 <= l["score"] <= 1 for l in d["layers"])


def test_probe_metrics_are_the_task_metrics():
    """One definition of each task metric: the probes score with fastsel.data.task_metrics (binary F1 of class 1)."""
    from sklearn.metrics import f1_score

    from fastsel.data.task_metrics import TASK_METRICS
    from fastsel.scores.probing import PROBE_METRICS

    assert all(PROBE_METRICS[name] is TASK_METRICS[name] for name in PROBE_METRICS)
    gen = np.random.default_rng(0)
    gold, pred = gen.integers(0, 2, 200), gen.integers(0, 2, 200)
    assert PROBE_METRICS["f1"](pred, gold) == pytest.approx(f1_score(gold, pred))
