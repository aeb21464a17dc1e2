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


def test_packages_export_their_main_names():
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
