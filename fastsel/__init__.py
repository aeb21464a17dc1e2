"""fastsel: which layers of a pretrained encoder to fine-tune, and fine-tuning only those.

The package tree is the flow (see docs/architecture.md): ``ops`` (the C++/CUDA kernels' Python face) -> ``hf``
(Hugging Face names) -> ``data`` -> ``capture`` (hooks -> accumulators) -> ``scores`` (accumulators -> layer
scores) -> ``pipeline`` (scoring runs, the metric registry) -> ``plans`` -> ``tuners`` -> ``train`` -> ``cli``.
The main names are importable from here (lazily: ``import fastsel`` stays light).
"""
from __future__ import annotations

import importlib

from fastsel.ops.backend import EXTENSION  # noqa: F401

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "LayerScore": "scores.layer_scores", "LayerScores": "scores.layer_scores",
    "fisher_diagonal": "scores.fisher", "fisher_layer_scores": "scores.fisher", "FisherResult": "scores.fisher",
    "accumulate_class_statistics": "scores.variability", "variability_layer_scores": "scores.variability",
    "ClassStatistics": "scores.variability",
    "SquaredGradAccumulator": "capture.per_example",
    "LayerMap": "hf.layer_map", "map_layers": "hf.layer_map", "load_model": "hf.loading",
    "get_task": "data.specs", "load_examples": "data.readers", "tokenize_examples": "data.features", "make_dataloader": "data.features",
    "ScoreConfig": "pipeline.config", "PipelineConfig": "pipeline.config", "METRICS": "pipeline.registry",
    "Metric": "pipeline.registry", "register_metric": "pipeline.registry", "score": "pipeline.run",
    "run_scoring": "pipeline.inmemory", "run_pipeline": "pipeline.streamed",
    "Plan": "plans.plan", "Tuning": "plans.plan", "LoraSpec": "plans.plan", "PlanError": "plans.plan",
    "build_plan": "plans.strategies", "register_strategy": "plans.strategies", "STRATEGIES": "plans.strategies",
    "apply_plan": "tuners.apply", "count_trainable": "tuners.apply", "with_counts": "tuners.apply",
    "TrainConfig": "train.config", "train_model": "train.loop", "save_trained": "train.saved",
    "load_trained": "train.saved", "RankStability": "train.rank_stability",
}
__all__ = ["EXTENSION", "__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fastsel.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fastsel' has no attribute {name!r}")
