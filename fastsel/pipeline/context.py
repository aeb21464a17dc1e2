"""What a metric's driver gets: the loaded model, tokenizer, layer map and task of one scoring run, with its
data in memory (:class:`ScoringContext`, for ``Metric.run``) or as a streamed corpus (:class:`PipelineContext`,
for ``Metric.consumer``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastsel.data.corpus import TokenizedCorpus
from fastsel.data.examples import Examples
from fastsel.data.features import make_dataloader
from fastsel.data.specs import TaskSpec
from fastsel.hf.layer_map import LayerMap
from fastsel.pipeline.config import PipelineConfig, ScoreConfig
from fastsel.scores.confidence import group_unit
from fastsel.scores.layer_scores import LayerScores

__all__ = ["ScoringContext", "PipelineContext"]


@dataclass
class ScoringContext:
    """What a metric gets: the loaded model and tokenised data of one ScoreConfig."""

    config: ScoreConfig
    model: nn.Module
    tokenizer: Any
    layer_map: LayerMap
    task: TaskSpec
    examples: Examples
    features: list[dict[str, list[int]]]
    progress: bool = True
    max_length_limit: int | None = None  # the model's longest input (``--max-length`` is clamped to it)

    def loader(self, batch_size: int | None = None, shuffle: bool = False):
        return make_dataloader(self.features, self.tokenizer, batch_size or self.config.batch_size, shuffle=shuffle, seed=self.config.seed)

    def scores(self, metric: str, layers: list, **kw: Any) -> LayerScores:
        return LayerScores(
            metric=metric,
            model=self.config.model,
            task=self.task.name,
            split=self.config.split,
            num_examples=len(self.features),
            layers=layers,
            **kw,
        )


@dataclass
class PipelineContext:
    """What a consumer factory gets."""

    config: ScoreConfig
    pipeline: PipelineConfig
    model: nn.Module
    tokenizer: Any
    layer_map: LayerMap
    task: TaskSpec
    device: torch.device
    num_examples: int
    corpus: TokenizedCorpus | None = None  # the pass's data (the Fisher label-dependence check rereads a share of it)
    progress: bool = True  # bars and progress lines (on rank 0); False: --no-progress

    @property
    def confidence_unit(self) -> str:
        """What the pass's --confidence-groups are made of: "batches" or "examples" (fastsel.scores.confidence)."""
        cfg = self.config
        return group_unit(self.num_examples, cfg.batch_size, cfg.confidence_groups, cfg.confidence_unit)
