"""Atomic checkpoints of a scoring pass: consumer states + position in the batch schedule + config fingerprint.

One file per rank (``<dir>/rank{r}-of-{K}.pt``): ranks never wait for each other to save, and each file is
self-consistent (its accumulators cover exactly its first ``cursor`` batches), so a kill at any moment
leaves every rank resumable. Files are written to a temporary name, fsync'ed, renamed over the old one
and the folder fsync'ed: a reader sees the old checkpoint or the new one, never a torn one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from fastsel.utils.atomic import atomic_write

__all__ = ["CheckpointMismatch", "fingerprint", "rank_file", "save_checkpoint", "load_checkpoint", "remove_checkpoint",
           "read_torch_file", "load_fingerprinted", "settings_diff"]

_FORMAT = "fastsel-checkpoint-1"


class CheckpointMismatch(ValueError):
    """A checkpoint written by a run with another configuration."""


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that decides the result of a pass."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def rank_file(directory: str | os.PathLike, rank: int, world_size: int) -> Path:
    return Path(directory) / f"rank{rank}-of-{world_size}.pt"


_KEYS = {"fingerprint", "cursor", "examples", "consumers"}  # what resuming reads


def read_torch_file(path: str | os.PathLike, what: str, fix: str) -> Any:
    """torch.load of ``path`` (a fastsel checkpoint); a file that is empty, truncated or not a torch file is one
    CheckpointMismatch line naming it and saying what to do (``fix``), not the reader's own words (pickle's "invalid
    load key", miniz's "failed finding central directory", "Ran out of input")."""
    size = os.path.getsize(path)
    with open(path, "rb"):  # a file that cannot be opened (permissions): that OSError, as it is
        pass
    if not _is_zip(path):
        # torch.save always writes a zip; handing anything else to torch.load means its legacy unpickler, which on
        # random bytes can ask for gigabytes (MemoryError) instead of failing
        why = "empty" if size == 0 else "not a torch checkpoint"
        raise CheckpointMismatch(f"fastsel: {what} {path} cannot be read ({why}, {size} bytes); {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the zip/pickle readers raise on a damaged file (even EINVAL)
        raise CheckpointMismatch(f"fastsel: {what} {path} cannot be read (truncated or damaged, {size} bytes: "
                                 f"{type(exc).__name__}); {fix}") from None


def _is_zip(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete the checkpoint file ``path`` (of a run that finished) and its folder when that is left empty."""
    path = Path(path)
    path.unlink(missing_ok=True)
    if path.parent.resolve() != Path.cwd().resolve():
        with contextlib.suppress(OSError):  # not empty (other ranks' files, the user's own), or already gone
            path.parent.rmdir()


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


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs; a group of settings (a dict) is compared key by key."""
    diff = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diff.append(f"{key}: {a!r} -> {b!r}" if not isinstance(a, (dict, list)) else f"{key} differs")
    return diff


def load_fingerprinted(path: str | os.PathLike, settings: dict[str, Any], *, format: str, keys: set[str], what: str,
                       not_ours: str, start_over: str) -> dict[str, Any] | None:
    """The fastsel checkpoint of format ``format`` at ``path`` (None when there is none), checked: readable (else a
    one-line CheckpointMismatch naming ``what`` and ``start_over``), of this format with ``keys`` (else ``not_ours``),
    and written with these ``settings`` (else one line listing what differs). The scoring pass and training share it."""
    path = Path(path)
    if not path.is_file():
        return None
    state = read_torch_file(path, what, start_over)
    if not isinstance(state, dict) or state.get("format") != format or not keys <= set(state):
        raise CheckpointMismatch(f"fastsel: {path} {not_ours}")
    if state["fingerprint"] != fingerprint(settings):
        shown = ", ".join(settings_diff(state.get("settings") or {}, settings)[:6])
        raise CheckpointMismatch(f"fastsel: {what} {path} was written by a run with other settings ({shown}); rerun with "
                                 "the same settings, or remove it / drop --resume to start over")
    return state


def load_checkpoint(path: str | os.PathLike, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint of a scoring pass at ``path`` (None when there is none); CheckpointMismatch when it is not one
    or its settings differ."""
    return load_fingerprinted(path, settings, format=_FORMAT, keys=_KEYS, what="--checkpoint file",
                              not_ours="is not a fastsel checkpoint of a scoring pass; delete it and rerun (the pass "
                                       "starts over), or give --checkpoint another folder",
                              start_over="delete it and rerun (the pass starts over)")
