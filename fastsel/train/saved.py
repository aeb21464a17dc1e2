"""A trained run on disk: only the trained parameters (safetensors), the plan and what rebuilds the base model;
:func:`load_trained` re-applies the plan to the base model and loads them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from fastsel.hf.loading import load_model
from fastsel.plans.plan import Plan
from fastsel.tuners.apply import apply_plan, trainable_parameters
from fastsel.utils.atomic import atomic_write, atomic_write_json

__all__ = ["save_trained", "load_trained"]

# Checkpoints: trained parameters only
# --------------------------------------------------------------------------------------------------

_WEIGHTS, _PLAN, _META = "trained.safetensors", "plan.json", "base.json"


def save_trained(model: nn.Module, plan: Plan, out_dir: str | Path, *, base_model: str, num_labels: int,
                 seed: int, extra: dict[str, Any] | None = None) -> Path:
    """Write the trained parameters (safetensors), the plan and what is needed to rebuild the base model."""
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().contiguous().cpu() for n, p in trainable_parameters(model)}
    blob = save(state, metadata={"format": "pt", "fastsel": "trained-parameters"})
    atomic_write(out / _WEIGHTS, lambda f: f.write(blob), binary=True)
    plan.to_json(out / _PLAN)
    meta = {"base_model": base_model, "num_labels": num_labels, "seed": seed, **(extra or {})}
    atomic_write_json(out / _META, meta)
    return out


def load_trained(run_dir: str | Path, *, device: str = "cpu", base_model: str | None = None):
    """(model, tokenizer, plan): the base model with the plan applied and the trained parameters loaded."""
    from safetensors.torch import load_file

    run = Path(run_dir)
    for name in (_WEIGHTS, _PLAN, _META):
        if not (run / name).is_file():
            raise FileNotFoundError(f"fastsel: {run} is not a fastsel run directory: {name} is missing")
    meta = json.loads((run / _META).read_text())
    plan = Plan.from_json(run / _PLAN)
    model, tokenizer, _ = load_model(base_model or meta["base_model"], num_labels=meta["num_labels"], seed=meta["seed"])
    apply_plan(model, plan)
    state = load_file(str(run / _WEIGHTS))
    expected = {n for n, _ in trainable_parameters(model)}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"fastsel: saved parameters do not match the plan: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), tokenizer, plan


# --------------------------------------------------------------------------------------------------
# Rank stability of the Fisher ranking during training
# --------------------------------------------------------------------------------------------------
