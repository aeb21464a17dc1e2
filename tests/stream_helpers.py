"""Helpers of the streamed-pass tests: a tiny encoder on disk, and a class-statistics test consumer."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from fastsel.pipeline.context import PipelineContext
from fastsel.pipeline.registry import BatchConsumer
from fastsel.scores.layer_scores import LayerScore, LayerScores
from fastsel.scores.variability import merge_class_stats


def save_tiny_bert(path: Path, minilm_path, hidden: int = 16, layers: int = 3, seed: int = 0) -> str:
    """A tiny random BERT with the real MiniLM tokenizer (vocab 30522), saved as a local model dir."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=128)
    BertForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(minilm_path)).save_pretrained(path)
    return str(path)


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over positions: hidden (B, T, D), mask (B, T) -> (B, D) float64."""
    m = mask.to(torch.float64).unsqueeze(-1)
    return (hidden.to(torch.float64) * m).sum(1) / m.sum(1)


def batch_class_stats(x: torch.Tensor, y: torch.Tensor, num_classes: int):
    """count (C,), mean (C, D), m2 (C, D, D) of rows x (N, D) float64 grouped by labels y (N,)."""
    D = x.shape[1]
    count = torch.zeros(num_classes, dtype=torch.int64)
    mean = torch.zeros(num_classes, D, dtype=torch.float64)
    m2 = torch.zeros(num_classes, D, D, dtype=torch.float64)
    for c in range(num_classes):
        xc = x[y == c]
        count[c] = xc.shape[0]
        if xc.shape[0]:
            mean[c] = xc.mean(0)
            d = xc - mean[c]
            m2[c] = d.T @ d
    return count, mean, m2


class ClassMeanConsumer(BatchConsumer):
    """Test consumer without backward: per-layer class statistics of mean-pooled hidden states.

    Score of layer l: within-class variance trace(sum_c M2_c) / N of the pooled states after block l.
    """

    name = "classmean"
    needs_backward = False
    needs_hidden_states = True

    def __init__(self, ctx: PipelineContext) -> None:
        self.ctx = ctx
        self.C = ctx.task.num_labels
        self.stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self.indices: list[int] = []  # examples seen, in order (to check the one-pass path)

    def capture(self, batch):
        return contextlib.nullcontext()

    def consume(self, batch, outputs) -> None:
        assert not torch.is_grad_enabled()
        hs = outputs.hidden_states[1:]
        y = batch["labels"].cpu()
        new = [batch_class_stats(pooled(h.detach(), batch["attention_mask"]).cpu(), y, self.C) for h in hs]
        self.stats = new if self.stats is None else [merge_class_stats(*a, *b) for a, b in zip(self.stats, new)]
        self.indices.extend(batch["index"].tolist())

    def state_dict(self) -> dict:
        return {"stats": self.stats, "indices": list(self.indices)}

    def load_state_dict(self, state: dict) -> None:
        self.stats, self.indices = state["stats"], list(state["indices"])

    def all_reduce(self, group=None) -> None:
        from fastsel.pipeline.distributed import all_gather_objects, all_merge_class_stats

        self.stats = [all_merge_class_stats(*s, group=group) for s in self.stats]
        self.indices = [i for part in all_gather_objects(self.indices, group) for i in part]

    def result(self) -> LayerScores:
        layers = [LayerScore(l, f"layer.{l}", float(m2.diagonal(dim1=1, dim2=2).sum() / c.sum()))
                  for l, (c, _, m2) in enumerate(self.stats)]
        return LayerScores("classmean", self.ctx.config.model, self.ctx.task.name, self.ctx.config.split,
                           int(self.stats[0][0].sum()), layers, higher_is_better=False)


def register_classmean() -> None:
    """Register the test metric in fastsel.pipeline.registry.METRICS, with its consumer (idempotent)."""
    from fastsel.pipeline.registry import METRICS, Metric, register_metric

    if "classmean" not in METRICS:
        register_metric(Metric(name="classmean", run=lambda ctx: None, classification_only=True, consumer=ClassMeanConsumer))
