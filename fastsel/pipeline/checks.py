"""Non-finite values and length limits, checked before and after a scoring pass."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from fastsel.hf.layer_map import LayerMap
from fastsel.hf.loading import max_sequence_length, quiet_transformers, resolve_model_path
from fastsel.scores.layer_scores import LayerScores

if TYPE_CHECKING:
    from fastsel.pipeline.config import ScoreConfig

__all__ = ["NonFiniteError", "apply_length_limit", "first_nonfinite_parameter", "check_weights_finite", "check_scores_finite"]


class NonFiniteError(ValueError):
    """NaN/Inf met in the loss, the logits, the statistics or the accumulators: no scores are written."""


def apply_length_limit(cfg: "ScoreConfig") -> int | None:
    """Clamp ``cfg.max_length`` (in place) to the longest input the model can take; returns that limit.

    A one-line note (rank 0 only) says when it clamps. None when the model's config gives no limit or
    cannot be read here (loading the model then reports that).
    """

    from transformers import AutoConfig

    path = resolve_model_path(cfg.model)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path, local_files_only=Path(path).is_dir())
    except (OSError, ValueError, KeyError):
        return None
    limit = max_sequence_length(config)
    if limit is not None and cfg.max_length > limit:
        if int(os.environ.get("RANK", "0")) == 0:
            import sys

            print(f"fastsel: note: --max-length {cfg.max_length} is more than {cfg.model} can take; "
                  f"using its limit, {limit} tokens", file=sys.stderr)
        cfg.max_length = limit
    return limit


def first_nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of the first floating-point parameter of ``model`` (in ``named_parameters()`` order) holding NaN or
    Inf, or None when every one is finite. Reads every parameter (one host sync each): for diagnosis, not per step."""
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            return name
    return None


def check_weights_finite(model: nn.Module, layer_map: LayerMap, name: str) -> None:
    """NonFiniteError naming the first parameter holding NaN/Inf (a broken checkpoint), before any pass."""
    pname = first_nonfinite_parameter(model)
    if pname is not None:
        group = layer_map.group_of(pname)
        raise NonFiniteError(
            f"fastsel: parameter {pname} ({group.replace('layer.', 'block ')}) of {name} holds NaN/Inf: the model's "
            "weights are broken; no scores written (reload or re-download the checkpoint)")


def check_scores_finite(scores: LayerScores) -> None:
    """NonFiniteError naming the first layer whose score or trace is NaN/Inf (before anything is written)."""

    entries = [(f"layer {l.layer} ({l.name})", {"score": l.score, "trace": l.trace}) for l in scores.layers]
    entries += [(str(name), d) for name, d in scores.extra.items() if isinstance(d, dict)]
    for where, d in entries:
        for key in ("score", "trace"):
            value = d.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise NonFiniteError(
                    f"fastsel: the {scores.metric} {key} of {where} is {value}: "
                    "non-finite values in the model or its statistics; no scores written (check the model's "
                    "weights; run in fp32, or with --autocast bf16 instead of fp16)")
