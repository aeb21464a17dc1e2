"""One import path per name: the old flat module paths are gone, the packages and fastsel itself export the main names."""
from __future__ import annotations

import importlib

import pytest

import fastsel

# the flat layout of fastsel 0.1 (and fastsel._backend): gone, one import path per name
OLD_MODULES = ["atomic", "progress", "models", "layers", "per_example", "confidence", "fisher", "plot", "metrics",
               "stream", "checkpoint", "distributed", "apply", "adapters", "tune_cli", "info", "scoring",
               "variability", "probing", "_backend", "_compat"]


@pytest.mark.parametrize("old", OLD_MODULES)
def test_old_module_paths_are_gone(old):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"fastsel.{old}")


@pytest.mark.parametrize("package, name, module", [
    ("data", "load_examples", "data.readers"), ("data", "tokenize_examples", "data.features"),
    ("pipeline", "PipelineConfig", "pipeline.config"), ("pipeline", "run_pipeline", "pipeline.streamed"),
    ("plans", "Plan", "plans.plan"), ("plans", "build_plan", "plans.strategies"),
    ("scores", "LayerScore", "scores.layer_scores"), ("scores", "LayerScores", "scores.layer_scores"),
    ("train", "train_model", "train.loop"), ("train", "FinetuneJob", "train.finetune"),
    ("train", "TrainConfig", "train.config"),
])
def test_packages_export_their_main_names(package, name, module):
    """The package's name is the defining module's object (one object, not a copy or a wrapper)."""
    exported = getattr(importlib.import_module(f"fastsel.{package}"), name)
    assert exported is getattr(importlib.import_module(f"fastsel.{module}"), name)


def test_main_names_from_the_root():
    for name in fastsel.__all__:
        assert getattr(fastsel, name) is not None, name
    with pytest.raises(AttributeError):
        fastsel.no_such_name  # noqa: B018
