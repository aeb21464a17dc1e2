"""Rank stability of the Fisher layer ranking during training (Lodha et al. section 4, Figs 2-5):
:class:`RankStability` re-computes it at chosen epochs and reports per-layer rank deviation and Kendall's tau against
epoch 0; :func:`trainer_callback` runs such epoch callbacks inside ``transformers.Trainer`` (whose optimizer, like
ours, only takes parameters with requires_grad)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
from torch import nn

from fastsel.data.features import PadCollator
from fastsel.scores.fisher import fisher_layer_scores
from fastsel.train.loop import EpochCallback
from fastsel.tuners.apply import is_added_parameter

__all__ = ["RankStability", "trainer_callback"]


@contextlib.contextmanager
def _all_blocks_trainable(model: nn.Module) -> Iterator[None]:
    """Every original block/embedding/head parameter requires grad (LoRA/adapter modules do not); restored after."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(not is_added_parameter(n))
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


class RankStability:
    """Fisher layer ranking at ``epochs`` (0 = before training) on fixed ``features``; deviation vs epoch 0.

    report(): {"epochs": {e: {"ranking", "scores", "rank_deviation" (per layer |rank_e - rank_0|),
    "mean_deviation", "max_deviation", "kendall_tau"}}}.
    """

    def __init__(self, features: Sequence[dict], tokenizer: Any, epochs: Sequence[int] = (0,), *, batch_size: int = 16,
                 mode: str = "empirical", seed: int = 0, device: str = "cpu", progress: bool = False,
                 name: str = "rank_stability") -> None:
        self.name = name  # the key of this callback's report in results.json
        if 0 not in epochs:
            epochs = (0, *epochs)
        self.features, self.epochs = list(features), sorted(set(int(e) for e in epochs))
        self.collator, self.batch_size, self.mode, self.seed = PadCollator(tokenizer), batch_size, mode, seed
        self.device, self.progress = device, progress
        self.results: dict[int, dict[str, Any]] = {}

    def _scores(self, model: nn.Module) -> list[float]:
        batches = (self.collator(self.features[i : i + self.batch_size]) for i in range(0, len(self.features), self.batch_size))
        with _all_blocks_trainable(model):
            scores, _ = fisher_layer_scores(model, batches, mode=self.mode, seed=self.seed, device=self.device,
                                            total=len(self.features), progress=self.progress)
        return [s.score for s in scores.layers]

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        from scipy.stats import kendalltau

        if epoch not in self.epochs:
            return
        values = self._scores(model)
        ranking = sorted(range(len(values)), key=lambda l: (-values[l], l))
        rank = [0] * len(values)
        for r, l in enumerate(ranking):
            rank[l] = r + 1
        entry: dict[str, Any] = {"ranking": ranking, "scores": values, "ranks": rank}
        if 0 in self.results:
            rank0 = self.results[0]["ranks"]
            dev = [abs(a - b) for a, b in zip(rank, rank0)]
            tau = kendalltau(rank0, rank).statistic if len(rank) > 1 else 1.0
            entry.update(rank_deviation=dev, mean_deviation=float(np.mean(dev)), max_deviation=int(max(dev)),
                         kendall_tau=float(tau))
        self.results[epoch] = entry

    def report(self) -> dict[str, Any]:
        return {"epochs": {str(e): r for e, r in sorted(self.results.items())}}


def trainer_callback(*callbacks: EpochCallback):
    """A ``transformers.TrainerCallback`` that runs fastsel epoch callbacks (epoch 0 at train begin)."""
    from transformers import TrainerCallback

    class _FastselCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            for cb in callbacks:
                cb.on_epoch_end(0, model)

        def on_epoch_end(self, args, state, control, model=None, **kw):
            for cb in callbacks:
                cb.on_epoch_end(int(round(state.epoch)), model)

    return _FastselCallback()


# --------------------------------------------------------------------------------------------------
# fastsel finetune
# --------------------------------------------------------------------------------------------------
