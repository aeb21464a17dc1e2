"""Apply a :class:`~fastsel.plans.Plan` to a Hugging Face encoder: truncation, LoRA, adapters, freezing.

Order: (1) remove the blocks above the head layer (the ``nn.ModuleList`` is cut and the config's layer
count updated, so the head reads block ``head_layer`` and the removed blocks cost nothing); (2) inject
LoRA through peft into the LoRA blocks (one ``LoraConfig`` with ``layers_to_transform``); (3) insert
Houlsby adapters into the adapter blocks; (4) set ``requires_grad`` of every parameter from the plan.
Group membership of a parameter comes from :func:`fastsel.hf.layer_map.map_layers` (exact name parsing, so a
plan for block 1 never touches block 10).
"""
from __future__ import annotations

import copy
from typing import Any, Iterator

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from fastsel.hf.arch_names import ArchNames, arch_names
from fastsel.hf.layer_map import EMBEDDINGS, HEAD, POOLER, LayerMap, map_layers
from fastsel.plans.plan import Plan, PlanError, Tuning
from fastsel.tuners.adapters import AdaptedLinear, insert_adapter

__all__ = ["apply_plan", "truncate_blocks", "trainable_parameters", "is_trainable_under", "is_added_parameter",
           "is_lora_parameter", "is_adapter_parameter", "meta_model", "count_trainable", "with_counts"]


def truncate_blocks(model: nn.Module, layer_map: LayerMap, head_layer: int) -> LayerMap:
    """Keep blocks 0..head_layer only; the head then reads block ``head_layer``. Returns the new map."""
    if not 0 <= head_layer < layer_map.num_layers:
        raise PlanError(f"fastsel: head layer {head_layer} out of range 0..{layer_map.num_layers - 1}")
    blocks = layer_map.blocks(model)
    del blocks[head_layer + 1 :]
    configs = {id(c): c for c in (getattr(model, "config", None),
                                   getattr(getattr(model, layer_map.backbone_name, None), "config", None)) if c is not None}
    for cfg in configs.values():
        for attr in ("num_hidden_layers", "n_layers"):
            if hasattr(cfg, attr):
                setattr(cfg, attr, head_layer + 1)
    return map_layers(model)


def _is_layernorm_param(model: nn.Module, name: str) -> bool:
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return isinstance(owner, nn.LayerNorm) or type(owner).__name__.lower().endswith("layernorm")


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :]


def is_lora_parameter(name: str) -> bool:
    """A LoRA matrix peft injected (``...lora_A...`` / ``...lora_B...``)."""
    return ".lora_" in f".{name}"


def is_adapter_parameter(name: str) -> bool:
    """A weight of a Houlsby adapter this module inserted (``...adapter...``)."""
    return ".adapter." in f".{name}"


def is_added_parameter(name: str) -> bool:
    """A parameter a plan added to the pretrained model (LoRA or adapter), not one of its own."""
    return is_lora_parameter(name) or is_adapter_parameter(name)


def is_trainable_under(tuning: Tuning, rel_name: str, names: ArchNames | None, is_layernorm: bool) -> bool:
    """Whether a parameter (name relative to its part) is trained under ``tuning``."""
    kind = tuning.kind
    if kind == "frozen":
        return False
    if kind == "full":
        return True
    is_bias = rel_name.endswith("bias")
    in_listed = names is not None and tuning.biases and names.sublayer_of(rel_name) in tuning.biases
    if kind == "bitfit":
        return is_bias and (not tuning.biases or bool(in_listed))
    if kind == "lora":
        return is_lora_parameter(rel_name) or (is_bias and bool(in_listed))
    if kind == "adapter":
        return is_adapter_parameter(rel_name) or is_layernorm
    raise PlanError(f"fastsel: unknown tuning kind {kind!r}")


def _inject_lora(model: nn.Module, plan: Plan, layer_map: LayerMap) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    kwargs = plan.to_peft(layer_map.model_type, layers_pattern=layer_map.blocks_name.rsplit(".", 1)[-1])
    kwargs.pop("modules_to_save")  # the head is handled by the plan, not by a peft wrapper
    inject_adapter_in_model(LoraConfig(**kwargs), model)


def apply_plan(model: nn.Module, plan: Plan, layer_map: LayerMap | None = None) -> nn.Module:
    """Apply ``plan`` to ``model`` in place and return it; only the plan's parameters keep requires_grad."""
    layer_map = layer_map or map_layers(model)
    if plan.num_layers != layer_map.num_layers:
        raise PlanError(f"fastsel: the plan has {plan.num_layers} blocks but the model has {layer_map.num_layers}")
    if any(isinstance(m, AdaptedLinear) for m in model.modules()) or any(is_lora_parameter(n) for n, _ in model.named_parameters()):
        raise PlanError("fastsel: the model already has LoRA or adapter modules; apply a plan to a fresh model")
    needs_names = any(t.kind in ("lora", "adapter") or t.biases for t in plan.blocks)
    names = arch_names(layer_map.model_type) if needs_names else None
    if plan.truncated:
        layer_map = truncate_blocks(model, layer_map, plan.head_at)
    if plan.tuned_layers("lora"):
        _inject_lora(model, plan, layer_map)
    for l in plan.tuned_layers("adapter"):
        assert names is not None
        block = model.get_submodule(layer_map.block_name(l))
        std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
        size = plan.blocks[l].adapter_size
        assert size is not None
        for path in (names.attention_out, names.ffn_out):
            insert_adapter(block, path, size, init_std=std)

    parts = {EMBEDDINGS: plan.embeddings, POOLER: plan.pooler, HEAD: plan.head}
    for name, p in model.named_parameters():
        group = layer_map.group_of(name)
        if group.startswith("layer."):
            l = int(group.split(".", 1)[1])
            rel = _relative(name, layer_map.block_name(l))
            tuning = plan.blocks[l]
        else:
            tuning = parts[group]
            rel = name
        p.requires_grad_(is_trainable_under(tuning, rel, names, _is_layernorm_param(model, name)))
    return model


def trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter with requires_grad -- what reaches the optimizer."""
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------
# Counting on the meta device (here, not in plans: counting applies the plan, and plans sit below apply)
# --------------------------------------------------------------------------------------------------


def meta_model(config: Any) -> nn.Module:
    """A sequence-classification model of ``config`` (a PretrainedConfig) on the meta device: no weights."""
    with torch.device("meta"):  # a copy: truncation updates the model's config
        return AutoModelForSequenceClassification.from_config(copy.deepcopy(config))


def count_trainable(plan: Plan, model_or_config: Any) -> dict[str, int]:
    """Trainable parameters per group (embeddings, layer.<l>, pooler, head), ``total`` and ``all_params``.

    ``model_or_config``: a PretrainedConfig (a meta-device model is built and the plan applied to it) or a
    model, which is deep-copied first so that the caller's model is left as it was.
    """
    if isinstance(model_or_config, nn.Module):
        model = copy.deepcopy(model_or_config)
    else:
        model = meta_model(model_or_config)
    all_params = sum(p.numel() for p in model.parameters())
    apply_plan(model, plan)
    layer_map = map_layers(model)
    counts: dict[str, int] = {}
    for group, names in layer_map.groups(model, trainable_only=True).items():
        counts[group] = sum(model.get_parameter(n).numel() for n in names)
    for l in range(layer_map.num_layers, plan.num_layers):  # removed blocks
        counts[f"layer.{l}"] = 0
    counts["total"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts["all_params"] = all_params
    return counts


def with_counts(plan: Plan, model_or_config: Any) -> Plan:
    """``plan`` carrying its trainable-parameter counts on ``model_or_config`` (see :func:`count_trainable`)."""
    return plan.with_counts(count_trainable(plan, model_or_config))
