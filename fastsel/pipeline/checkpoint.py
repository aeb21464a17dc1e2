"""Atomic checkpoints of a scoring pass: consumer states + position in the batch schedule + config fingerprint.

One file per rank (``<dir>/rank{r}-of-{K}.pt``): ranks never wait for each other to save, and each file is
self-consistent (its accumulators cover exactly its first ``cursor`` batches), so a kill at any moment
leaves every rank resumable. Files are written to a temporary name, fsync'ed, renamed over the old one
and the folder fsync'ed: a reader sees the old checkpoint or the new one, never a torn one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from fastsel.utils.atomic import atomic_write

__all__ = ["CheckpointMismatch", "fingerprint", "rank_file", "save_checkpoint", "load_checkpoint"]

_FORMAT = "fastsel-checkpoint-1"


class CheckpointMismatch(ValueError):
    """A checkpoint written by a run with another configuration."""


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that decides the result of a pass."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def rank_file(directory: str | os.PathLike, rank: int, world_size: int) -> Path:
    return Path(directory) / f"rank{rank}-of-{world_size}.pt"


def save_checkpoint(path: str | os.PathLike, *, settings: dict[str, Any], cursor: int, examples: int,
                    consumers: dict[str, dict], complete: bool = False, extra: dict[str, Any] | None = None) -> None:
    """Write {settings, fingerprint, cursor (batches done), examples, consumer states} atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": _FORMAT, "settings": settings, "fingerprint": fingerprint(settings), "cursor": int(cursor),
             "examples": int(examples), "consumers": consumers, "complete": bool(complete)}
    if extra:
        state["extra"] = extra  # e.g. the --until-stable check history
    atomic_write(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path: str | os.PathLike, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None when there is none); CheckpointMismatch when its settings differ."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointMismatch(f"fastsel: {path} is not a fastsel checkpoint")
    if state["fingerprint"] != fingerprint(settings):
        old = state.get("settings", {})
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff[:6])
        raise CheckpointMismatch(
            f"fastsel: checkpoint {path} was written by a run with other settings ({shown}); "
            f"rerun with the same settings, or remove the checkpoint / drop --resume to start over"
        )
    return state
