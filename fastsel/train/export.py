"""Trained plans as PEFT adapters, and what PEFT cannot hold beside them.

``fastsel finetune`` writes ``OUT/peft/`` with :func:`export_trained`:

- ``adapter_config.json`` + ``adapter_model.safetensors`` (plans with LoRA blocks): a PEFT LoRA adapter
  (``task_type`` SEQ_CLS) whose ``modules_to_save`` hold the model's head modules (``LayerMap.head_names``)
  with their trained values, and any module the base checkpoint lacked (a pooler it did not ship), so that
  ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=n), folder)``
  gives fastsel's logits;
- ``fastsel_extras.safetensors``: the trained parameters a ``LoraConfig`` cannot express (whole blocks,
  BitFit biases, Houlsby adapters and their LayerNorms, trained embeddings or pooler; the head too when there is
  no LoRA adapter), named as in the plain Hugging Face model (no ``base_layer`` / ``modules_to_save``);
- ``fastsel_export.json``: the base model, the number of labels, the plan, which names are where, and the
  note of :func:`peft_note`.

:func:`load_exported` puts both together on a base model: it removes the blocks above the plan's head layer,
inserts the plan's adapters, loads the PEFT adapter (when there is one) and then the extras, and returns a model
with fastsel's logits (a ``PeftModel`` when there is an adapter, else the base model itself).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastsel.hf.arch_names import arch_names
from fastsel.hf.layer_map import HEAD, map_layers
from fastsel.hf.loading import new_parameter_names, resolve_model_path
from fastsel.plans.plan import Plan, PlanError
from fastsel.tuners.adapters import insert_adapter
from fastsel.tuners.apply import is_lora_parameter, meta_model, truncate_blocks
from fastsel.utils.atomic import atomic_write, atomic_write_json

__all__ = ["EXPORT_DIR", "MANIFEST", "EXTRAS", "peft_gaps", "peft_note", "tuning_summary", "export_trained",
           "load_exported"]

EXPORT_DIR = "peft"  # under a fastsel finetune run directory
MANIFEST = "fastsel_export.json"
EXTRAS = "fastsel_extras.safetensors"
_FORMAT = "fastsel-export-1"


# --------------------------------------------------------------------------------------------------
# What a plan is, in words
# --------------------------------------------------------------------------------------------------


def _blocks(layers: Sequence[int]) -> str:
    return f"block{'s' if len(layers) > 1 else ''} {', '.join(str(l) for l in layers)}"


def _and(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def peft_gaps(plan: Plan) -> list[str]:
    """What of ``plan`` a ``peft.LoraConfig`` cannot express (empty for a pure LoRA plan), as phrases."""
    gaps = []
    full = plan.tuned_layers("full")
    if full:
        gaps.append(f"whole {_blocks(full)}")
    biases = [l for l, t in enumerate(plan.blocks) if t.kind == "bitfit" or (t.kind == "lora" and t.biases)]
    bias_parts = [p for p in ("embeddings", "pooler") if getattr(plan, p).kind == "bitfit"]
    if biases or bias_parts:
        where = ([_blocks(biases)] if biases else []) + [f"the {p}" for p in bias_parts]
        gaps.append(f"BitFit biases ({_and(where)})")
    adapters = plan.tuned_layers("adapter")
    if adapters:
        gaps.append(f"Houlsby adapters ({_blocks(adapters)})")
    gaps += [f"the whole {p}" for p in ("embeddings", "pooler") if getattr(plan, p).kind == "full"]
    if plan.truncated:
        gaps.append(f"the head on block {plan.head_at} (the blocks above it removed)")
    return gaps


def peft_note(plan: Plan) -> str | None:
    """One line saying what a LoraConfig of ``plan`` leaves out and where fastsel puts it (None: nothing)."""
    gaps = peft_gaps(plan)
    if not plan.tuned_layers("lora"):
        return (f"note: plan {plan.strategy} has no LoRA block and trains {_and(gaps) if gaps else 'no block'}, which a "
                f"LoraConfig cannot express; fastsel finetune saves them in OUT/{EXPORT_DIR}/{EXTRAS} "
                "(fastsel.train.export.load_exported)")
    if not gaps:
        return None
    return (f"note: a LoraConfig cannot express this plan's {_and(gaps)}; fastsel finetune saves them beside the adapter "
            f"in OUT/{EXPORT_DIR}/{EXTRAS} (fastsel.train.export.load_exported loads both)")


def tuning_summary(plan: Plan) -> str:
    """One line: what a plan tunes, e.g. ``tuning blocks 4, 5 and the head (fisher-top-2)``."""
    parts = []
    if plan.embeddings.trains:
        parts.append("the embeddings" + ("" if plan.embeddings.kind == "full" else f" ({plan.embeddings.short()})"))
    kinds: dict[str, list[int]] = {}
    for l, t in enumerate(plan.blocks):
        if t.trains:
            kinds.setdefault(t.short(), []).append(l)
    if len(kinds) == 1 and "full" in kinds:
        parts.append(_blocks(kinds["full"]))
    else:
        parts += [f"{_blocks(ls)} ({how})" for how, ls in kinds.items()]
    if plan.pooler.trains:
        parts.append("the pooler" + ("" if plan.pooler.kind == "full" else f" ({plan.pooler.short()})"))
    if plan.head.trains:
        parts.append("the head" + ("" if plan.head.kind == "full" else f" ({plan.head.short()})"))
    where = f"; the head reads block {plan.head_at}, blocks above it removed" if plan.truncated else ""
    return f"tuning {_and(parts) if parts else 'nothing'} ({plan.strategy}{where})"


# --------------------------------------------------------------------------------------------------
# Names: the plain Hugging Face name of a parameter of a LoRA-injected or PEFT-wrapped model
# --------------------------------------------------------------------------------------------------


def _plain(name: str) -> str:
    """``...query.base_layer.bias`` -> ``...query.bias``; ``classifier.modules_to_save.default.weight`` ->
    ``classifier.weight`` (LoRA matrices keep their ``lora_A.default`` names)."""
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def _named(model: nn.Module) -> dict[str, nn.Parameter]:
    """Plain name -> parameter, skipping the frozen originals peft keeps beside its modules_to_save copies."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_plain(n): p for n, p in inner.named_parameters() if ".original_module." not in f".{n}"}


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def _save_safetensors(path: Path, state: dict[str, torch.Tensor], what: str) -> None:
    from safetensors.torch import save

    blob = save(state, metadata={"format": "pt", "fastsel": what})
    atomic_write(path, lambda f: f.write(blob), binary=True)


def _write_peft(model: nn.Module, plan: Plan, folder: Path, layer_map, modules_to_save: list[str],
                base_model: str) -> set[str]:
    """The PEFT adapter of ``model``'s LoRA blocks and ``modules_to_save``; returns the plain names it holds."""
    from peft import LoraConfig, get_peft_model

    kw = plan.to_peft(layer_map.model_type, layers_pattern=layer_map.blocks_name.rsplit(".", 1)[-1],
                      head_names=layer_map.head_names)
    kw["modules_to_save"] = list(modules_to_save)  # a copy: peft extends it in place
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the same architecture on the meta device: peft builds its wrappers there, fastsel's values are assigned
        peft_model = get_peft_model(meta_model(model.config), LoraConfig(**kw, task_type="SEQ_CLS"))
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    ours = _named(model)
    state, held = {}, set()
    for name, p in peft_model.named_parameters():
        if ".original_module." in name or not (is_lora_parameter(name) or ".modules_to_save." in name):
            continue
        plain = _plain(name.removeprefix("base_model.model."))
        if plain not in ours or ours[plain].shape != p.shape:
            raise PlanError(f"fastsel: cannot export {plain} to PEFT: the trained model has no such parameter")
        state[name] = ours[plain].detach().to("cpu", copy=True).contiguous()
        held.add(plain)
    lora = {n for n in ours if is_lora_parameter(n)}
    if lora - held:
        raise PlanError(f"fastsel: the PEFT adapter would leave out LoRA matrices {sorted(lora - held)[:3]}")
    peft_model.load_state_dict(state, strict=False, assign=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(folder))
    return held


def export_trained(model: nn.Module, plan: Plan, out_dir: str | Path, *, base_model: str, num_labels: int) -> dict[str, Any]:
    """Write ``model`` (trained under ``plan``, which is applied to it) as a PEFT adapter plus extras (module
    docstring) into ``out_dir``; returns the manifest (also written as ``fastsel_export.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layer_map = map_layers(model)
    params = dict(model.named_parameters())
    head = {n for n in params if layer_map.group_of(n) == HEAD}
    # parameters the base checkpoint lacked (the new head, a pooler it did not ship): a fresh load draws others
    new = {n for n in params if _plain(n) in new_parameter_names(model)} | head
    keep = {n for n, p in params.items() if p.requires_grad or n in new}
    has_lora = bool(plan.tuned_layers("lora"))
    held: set[str] = set()
    modules: list[str] = []
    if has_lora:
        modules = list(layer_map.head_names)
        for n in sorted(new - head):
            owner = n.rsplit(".", 1)[0]
            if ".base_layer" not in owner and owner not in modules and layer_map.layer_of(n) is None:
                modules.append(owner)
        held = _write_peft(model, plan, out, layer_map, modules, base_model)
    else:
        for stale in ("adapter_config.json", "adapter_model.safetensors"):
            (out / stale).unlink(missing_ok=True)  # a LoRA run's adapter left in a reused folder
    extras = {_plain(n): params[n].detach().to("cpu", copy=True).contiguous() for n in sorted(keep)
              if _plain(n) not in held}
    lost = [n for n in extras if is_lora_parameter(n)]
    if lost:
        raise PlanError(f"fastsel: LoRA matrices outside the PEFT adapter: {lost[:3]}")
    _save_safetensors(out / EXTRAS, extras, "trained-parameters-outside-peft")
    manifest = {
        "format": _FORMAT,
        "base_model": base_model,
        "num_labels": num_labels,
        "model_type": layer_map.model_type,
        "peft": has_lora,
        "modules_to_save": modules,
        "num_hidden_layers": plan.head_at + 1,
        "truncated": plan.truncated,
        "extras": sorted(extras),
        "note": peft_note(plan),
        "plan": plan.to_dict(),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_exported(base: nn.Module | str | Path, folder: str | Path, *, device: str | torch.device | None = None) -> nn.Module:
    """The model fastsel trained, rebuilt from ``folder`` (written by :func:`export_trained`) on ``base``.

    ``base``: the base model (``AutoModelForSequenceClassification.from_pretrained(base, num_labels=n)``; changed
    in place, as ``PeftModel.from_pretrained`` does) or its name/path (loaded so, ``num_labels`` from the folder).
    Returns a ``PeftModel`` when the folder holds an adapter, else ``base`` itself, in eval mode.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"fastsel: {folder} is not a fastsel export: {MANIFEST} is missing")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != _FORMAT:
        raise ValueError(f"fastsel: {folder / MANIFEST} is not a {_FORMAT} manifest")
    if isinstance(base, (str, Path)):
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(str(base)),
                                                                  num_labels=manifest["num_labels"],
                                                                  ignore_mismatched_sizes=True)
    plan = Plan.from_dict(manifest["plan"])
    layer_map = map_layers(base)
    if layer_map.num_layers != plan.num_layers:
        raise PlanError(f"fastsel: the export is of a {plan.num_layers}-block model, the base has {layer_map.num_layers}")
    if plan.truncated:
        layer_map = truncate_blocks(base, layer_map, plan.head_at)
    adapters = plan.tuned_layers("adapter")
    if adapters:
        names = arch_names(layer_map.model_type)
        for l in adapters:
            block, size = base.get_submodule(layer_map.block_name(l)), plan.blocks[l].adapter_size
            assert size is not None
            for path in (names.attention_out, names.ffn_out):
                insert_adapter(block, path, size)
    model: nn.Module = base
    if manifest["peft"]:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(folder))
    from safetensors.torch import load_file

    extras = load_file(str(folder / EXTRAS))
    targets = _named(model)
    missing = sorted(set(extras) - set(targets))
    if missing:
        raise ValueError(f"fastsel: the base model has no parameters {missing[:3]} of the export; is it the base "
                         f"model {manifest['base_model']!r}?")
    with torch.no_grad():
        for name, value in extras.items():
            if targets[name].shape != value.shape:
                raise ValueError(f"fastsel: {name} is {tuple(value.shape)} in the export but {tuple(targets[name].shape)} "
                                 f"in the base model")
            targets[name].copy_(value)
    if device is not None:
        model.to(device)
    return model.eval()
