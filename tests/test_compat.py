"""Old module paths of the flat layout still import, and the main names import from fastsel itself."""
from __future__ import annotations

import importlib

import pytest

import fastsel


def test_moved_modules_are_the_new_module_objects():
    for old, new in [("fisher", "scores.fisher"), ("per_example", "capture.per_example"), ("layers", "hf.layer_map"),
                     ("models", "hf.loading"), ("apply", "tuners.apply"), ("confidence", "scores.confidence"),
                     ("checkpoint", "pipeline.checkpoint"), ("info", "cli.info")]:
        assert importlib.import_module(f"fastsel.{old}") is importlib.import_module(f"fastsel.{new}"), old


def test_split_and_renamed_names_resolve():
    from fastsel.metrics import METRICS as task_metrics
    from fastsel.probing import TASK_METRICS, cca_score
    from fastsel.scoring import METRICS, ScoreConfig, register_metric, run_scoring
    from fastsel.stream import plan_batches
    from fastsel.variability import VariabilityConsumer, accumulate_class_statistics, pool_mask

    assert METRICS is importlib.import_module("fastsel.pipeline.registry").METRICS and "fisher" in METRICS
    assert ScoreConfig is fastsel.ScoreConfig and run_scoring is fastsel.run_scoring and callable(register_metric)
    assert task_metrics is importlib.import_module("fastsel.data.task_metrics").TASK_METRICS
    assert plan_batches is importlib.import_module("fastsel.data.corpus").schedule_batches
    assert set(TASK_METRICS) == {"accuracy", "f1", "mcc"} and callable(cca_score)
    assert callable(pool_mask) and callable(accumulate_class_statistics) and VariabilityConsumer.name == "variability"
    with pytest.raises(ImportError):
        from fastsel.scoring import no_such_name  # noqa: F401


def test_packages_that_replaced_modules_export_the_old_names():
    from fastsel.data import load_examples, tokenize_examples  # noqa: F401
    from fastsel.pipeline import PipelineConfig, run_pipeline  # noqa: F401
    from fastsel.plans import Plan, build_plan  # noqa: F401
    from fastsel.scores import LayerScore, LayerScores  # noqa: F401
    from fastsel.train import train_model  # noqa: F401


def test_main_names_from_the_root():
    for name in fastsel.__all__:
        assert getattr(fastsel, name) is not None, name
    with pytest.raises(AttributeError):
        fastsel.no_such_name  # noqa: B018
