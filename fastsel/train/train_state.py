"""The training state of a run (``OUT/train-state.pt``): everything that decides the rest of the run (trainable
parameters, optimizer, scheduler, RNG, position, history), written atomically and read back only by the run whose
settings it was written with (:func:`train_settings` is its fingerprint)."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fastsel.pipeline.checkpoint import load_fingerprinted
from fastsel.plans.plan import Plan
from fastsel.train.config import TrainConfig
from fastsel.utils.atomic import atomic_write

__all__ = ["rng_state", "set_rng_state", "train_settings", "save_train_checkpoint", "load_train_checkpoint",
           "check_extension"]

_TRAIN_FORMAT = "fastsel-train-checkpoint-1"


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train_settings(cfg: TrainConfig, plan: Plan, train_features: Sequence[dict], eval_features: Sequence[dict]) -> dict:
    """What decides a training run (the checkpoint's fingerprint): settings, plan and a hash of the data."""
    h = hashlib.sha256()
    for part, feats in (("train", train_features), ("eval", eval_features)):
        h.update(part.encode())
        for f in feats:
            h.update(np.asarray(f["input_ids"], dtype=np.int64).tobytes())
            h.update(repr(f.get("labels")).encode())
    # epochs is left out: resuming with more (or fewer) epochs extends the run (train_model says so and records it)
    train = {k: v for k, v in cfg.to_dict().items()
             if k not in ("progress", "state_file", "checkpoint_every_steps", "resume", "device", "epochs")}
    return {"train": train, "plan": plan.to_dict(), "data": h.hexdigest(), "num_train": len(train_features),
            "num_eval": len(eval_features)}


def save_train_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save of ``state`` to a temporary file beside ``path``, fsync'ed and renamed over it."""
    atomic_write(path, lambda f: torch.save({"format": _TRAIN_FORMAT, **state}, f), binary=True)


def load_train_checkpoint(path: str | Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The training checkpoint at ``path`` (None when there is none); CheckpointMismatch when it is another run's."""
    return load_fingerprinted(path, settings, format=_TRAIN_FORMAT, keys={"fingerprint", "params", "optimizer"},
                              what="training checkpoint",
                              not_ours="is not a fastsel training checkpoint; delete it and rerun without --resume "
                                       "(training starts over)",
                              start_over="delete it and rerun without --resume (training starts over)")


def check_extension(state: dict[str, Any], cfg: TrainConfig, steps_per_epoch: int) -> dict[str, Any] | None:
    """None when the checkpoint was written with ``cfg.epochs``; else the record of the extension (or shortening)
    to ``cfg.epochs``, or a one-line ValueError when ``cfg.epochs`` would end before what was already trained."""
    saved = int(state.get("epochs", cfg.epochs))
    if saved == cfg.epochs:
        return None
    done = state["epoch"] - 1 + (1 if state["batch"] else 0)  # epochs begun; a begun epoch is finished first
    if cfg.epochs < done:
        raise ValueError(f"fastsel: --epochs {cfg.epochs}: the training checkpoint has trained {state['epoch'] - 1} "
                         f"epoch(s){' and part of the next' if state['batch'] else ''} already; give --epochs {done} or "
                         "more to continue it")
    return {"from_epochs": saved, "to_epochs": cfg.epochs, "at_step": int(state["step"]),
            "at_epoch": int(state["epoch"]), "at_batch": int(state["batch"]),
            "note": (f"training goes on to {cfg.epochs} epochs instead of {saved} (from step {state['step']}): the "
                     f"learning rate follows the {cfg.epochs}-epoch schedule ({steps_per_epoch * cfg.epochs} steps) "
                     "from there, so the result is not the same as that of a run of "
                     f"{cfg.epochs} epochs from the start")}
