"""fastsel.train.loop: the task metrics against sklearn/scipy, the cached frozen prefix, seeded training that keeps
the best epoch, evaluation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastsel.capture.prefix_cache import PrefixCache
from fastsel.data.features import PadCollator
from fastsel.data.task_metrics import TASK_METRICS, task_metrics
from fastsel.hf.layer_map import map_layers
from fastsel.plans.plan import LoraSpec
from fastsel.plans.strategies import build_plan
from fastsel.train.config import TrainConfig
from fastsel.train.loop import cacheable_prefix, evaluate, train_model
from fastsel.tuners.apply import apply_plan, trainable_parameters
from tests.tiny_models import tiny_model
from tests.train.train_helpers import TOK, dropout_free, features

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# -- metrics ------------------------------------------------------------------------------------------


def test_metrics_against_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    g = np.random.default_rng(0)
    for trial in range(5):
        gold, pred = g.integers(0, 2, 200), g.integers(0, 2, 200)
        assert TASK_METRICS["accuracy"](pred, gold) == pytest.approx(accuracy_score(gold, pred))
        assert TASK_METRICS["f1"](pred, gold) == pytest.approx(f1_score(gold, pred))
        assert TASK_METRICS["mcc"](pred, gold) == pytest.approx(matthews_corrcoef(gold, pred))
        gold3, pred3 = g.integers(0, 3, 100), g.integers(0, 3, 100)
        assert TASK_METRICS["mcc"](pred3, gold3) == pytest.approx(matthews_corrcoef(gold3, pred3))
        x, y = g.normal(size=50), np.round(g.normal(size=50), 1)  # ties in y
        assert TASK_METRICS["pearson"](x, y) == pytest.approx(pearsonr(x, y).statistic)
        assert TASK_METRICS["spearman"](x, y) == pytest.approx(spearmanr(x, y).statistic)
    # degenerate cases: constant predictions
    assert TASK_METRICS["mcc"](np.zeros(10), g.integers(0, 2, 10)) == 0.0
    assert TASK_METRICS["f1"](np.zeros(10), np.zeros(10)) == 0.0
    assert set(task_metrics("mrpc", pred, gold)) == {"f1", "accuracy"}
    assert set(task_metrics("stsb", x, y)) == {"pearson", "spearman"}
    assert set(task_metrics("cola", pred, gold)) == {"mcc"}
    with pytest.raises(ValueError, match="no examples"):
        task_metrics("sst2", np.array([]), np.array([]))


# -- cached prefix ------------------------------------------------------------------------------------


def test_cacheable_prefix():
    assert cacheable_prefix(build_plan("position-top-2", 6)) == 4
    assert cacheable_prefix(build_plan("spafit-1-3-i", 6)) == 2  # group 2 (BitFit) starts at block 2
    assert cacheable_prefix(build_plan("full", 6)) == 0
    assert cacheable_prefix(build_plan("lora-i", 6)) == 0
    assert cacheable_prefix(build_plan("layers-1-1-2", 6)) == 1


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_cached_forward_equals_full_forward(arch):
    model = tiny_model(arch, num_layers=4, seed=3)
    feats = features(10, seed=1)
    collator = PadCollator(TOK)
    cache = PrefixCache(model, map_layers(model), 2, feats, collator, batch_size=4)
    idx = [7, 2, 5]
    batch = collator([feats[i] for i in idx])
    inputs = {k: v for k, v in batch.items() if k not in ("special_tokens_mask", "labels")}
    if arch == "distilbert":
        inputs.pop("token_type_ids")
    with torch.no_grad():
        ref = model(**inputs).logits
        with cache.activate(model):
            cache.set_batch(idx)
            out = model(**inputs).logits
        again = model(**inputs).logits  # modules restored
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, ref)


@pytest.mark.parametrize("strategy", ["position-top-2", "spafit-0-1-i"])
def test_cached_prefix_training_equals_uncached(strategy):
    train, dev = features(40, seed=1), features(16, seed=2)
    results = {}
    for mode in ("on", "off"):
        model = dropout_free()
        plan = build_plan(strategy, 4, lora=LoraSpec(r=2, alpha=4))
        apply_plan(model, plan)
        cfg = TrainConfig(epochs=2, lr=5e-3, batch_size=8, seed=5, cache_prefix=mode, progress=False)
        res = train_model(model, plan, train, dev, "sst2", TOK, cfg)
        results[mode] = (res, {n: p.detach().clone() for n, p in trainable_parameters(model)})
    (on, p_on), (off, p_off) = results["on"], results["off"]
    assert on.cache is not None and on.cache["blocks"] == cacheable_prefix(plan) and off.cache is None
    assert p_on.keys() == p_off.keys()
    for n in p_on:
        torch.testing.assert_close(p_on[n], p_off[n], rtol=1e-4, atol=1e-5)
    for a, b in zip(on.history, off.history):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)
        assert a.metrics == pytest.approx(b.metrics)


def test_training_is_seeded_and_keeps_best_epoch():
    train, dev = features(32, seed=1), features(16, seed=2)
    runs = []
    for _ in range(2):
        model = tiny_model("bert", num_layers=3)  # with dropout
        plan = build_plan("full", 3)
        apply_plan(model, plan)
        res = train_model(model, plan, train, dev, "sst2", TOK, TrainConfig(epochs=3, lr=1e-3, batch_size=8, seed=1, progress=False))
        runs.append((res, model.classifier.weight.detach().clone()))
    (a, wa), (b, wb) = runs
    assert [r.train_loss for r in a.history] == [r.train_loss for r in b.history]
    torch.testing.assert_close(wa, wb)
    best = max(range(3), key=lambda e: (a.history[e].metrics["accuracy"], -e))
    assert a.best_epoch == best + 1 and a.best_metrics == a.history[best].metrics


def test_evaluate_reports_the_models_predictions():
    model = tiny_model("bert", num_layers=2)
    feats = features(12)
    metrics, loss, pred = evaluate(model, feats, "sst2", PadCollator(TOK), batch_size=5)
    gold = np.array([f["labels"] for f in feats])
    assert metrics["accuracy"] == pytest.approx(float(np.mean(pred == gold)))
    assert loss > 0
