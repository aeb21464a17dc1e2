"""Optimisation settings of a training run (:class:`TrainConfig`): settings fields from which ``fastsel finetune``
makes its training flags; validated on construction, round-trips through JSON."""
from __future__ import annotations

import math
from dataclasses import dataclass

from fastsel.utils.settings import JsonSettings, setting

__all__ = ["TrainConfig", "CACHE_PREFIX"]

CACHE_PREFIX = ("auto", "on", "off")


@dataclass(kw_only=True)
class TrainConfig(JsonSettings):
    """How the trainable parameters are optimised, and how the run is checkpointed and resumed."""

    epochs: int = setting(3, "training epochs")
    lr: float = setting(2e-5, "peak learning rate (linear warmup, then linear decay)")
    batch_size: int = setting(16, "training examples per step")
    eval_batch_size: int = setting(64, "evaluation examples per batch", cli=False)
    warmup_ratio: float = setting(0.06, "share of the steps spent warming up")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_grad_norm: float | None = setting(1.0, "gradient clipping norm (None or 0: off)", cli=False)
    seed: int = setting(0, "seed of the subsets, the head and the shuffling")
    device: str = setting("cpu", "torch device (cpu, cuda, cuda:1, ...)")
    cache_prefix: str = setting("auto", "train on cached outputs of a frozen bottom (auto: when the plan allows it)",
                                choices=CACHE_PREFIX)
    progress: bool = setting(True, "no progress bars (fastsel's, transformers', datasets')", flag="--no-progress")
    # the training state (trainable parameters, optimizer, scheduler, RNG, position), written atomically;
    # fastsel finetune sets it to OUT/train-state.pt
    state_file: str | None = setting(None, "training-state file", cli=False)
    checkpoint_every_steps: int = setting(0, "also checkpoint every STEPS optimizer steps (always at each epoch end) "
                                          "to OUT/train-state.pt", flag="--checkpoint-every", metavar="STEPS")
    resume: bool = setting(False, "continue an interrupted run from OUT/train-state.pt (same settings; same result as "
                           "uninterrupted); with another --epochs, the run goes on to that many epochs (a finished one "
                           "too, if it kept its state with --keep-checkpoints)")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"fastsel: epochs (--epochs) must be >= 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"fastsel: lr (--lr) must be a finite number > 0, got {self.lr}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"fastsel: batch sizes must be >= 1, got {self.batch_size} and {self.eval_batch_size}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"fastsel: warmup_ratio (--warmup-ratio) must be in [0, 1), got {self.warmup_ratio}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"fastsel: weight_decay (--weight-decay) must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.seed < 2**32:  # numpy's seeds (the data subsets, the shuffling)
            raise ValueError(f"fastsel: seed (--seed) must be in 0..{2**32 - 1}, got {self.seed}")
        if self.cache_prefix not in CACHE_PREFIX:
            raise ValueError(f"fastsel: cache_prefix must be auto, on or off, got {self.cache_prefix!r}")
        if self.checkpoint_every_steps < 0:
            raise ValueError(f"fastsel: checkpoint_every_steps (--checkpoint-every) must be >= 0, got "
                             f"{self.checkpoint_every_steps}")
