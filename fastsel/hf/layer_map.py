"""Layer map of a Hugging Face encoder: embeddings, the L transformer blocks 0..L-1, pooler and head.

Found by structure, not by a list of names: the blocks are the longest ``nn.ModuleList`` of identical
modules inside the backbone (``model.base_model``); the embeddings are the backbone child that holds
the input embedding table; the head is whatever the task model adds around the backbone. Parameters
are assigned to groups by parsing their names exactly (``...layer.1.`` never matches ``...layer.10.``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

__all__ = ["LayerMap", "UnsupportedArchitectureError", "map_layers", "EMBEDDINGS", "POOLER", "HEAD"]

EMBEDDINGS, POOLER, HEAD = "embeddings", "pooler", "head"

# Architectures that reuse one block for several layers: a per-layer score or a per-layer freeze
# would be meaningless for them.
_SHARED_LAYER_TYPES = {"albert"}


class UnsupportedArchitectureError(ValueError):
    """The model's blocks could not be found, or its layers share parameters."""


@dataclass(frozen=True)
class LayerMap:
    """Where the parts of an encoder live, as qualified module names of the task model.

    ``blocks_name`` is the ModuleList of blocks, so block ``l`` is ``f"{blocks_name}.{l}"``.
    Every trainable parameter belongs to exactly one group: ``"embeddings"`` (token/position/type
    embeddings and anything else of the backbone outside the blocks, e.g. DeBERTa's relative position
    table), ``"layer.<l>"``, ``"pooler"`` (the backbone's pretrained pooler) or ``"head"`` (what the task
    model adds: classifier, DeBERTa's context pooler, ...). ``final_norm_name`` is the norm pre-LN
    backbones (Llama, Qwen2, ModernBERT) apply to the last block's output: it belongs to the last layer
    (its output is the last hidden state, HF's ``hidden_states[-1]``), not to the embeddings.
    """

    model_type: str
    num_layers: int
    backbone_name: str  # "" when the model is the backbone itself
    embeddings_name: str
    blocks_name: str
    pooler_name: str | None
    head_names: tuple[str, ...] = field(default_factory=tuple)
    final_norm_name: str | None = None

    def block_name(self, layer: int) -> str:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range: the model has blocks 0..{self.num_layers - 1}")
        return f"{self.blocks_name}.{layer}"

    def layer_of(self, param_name: str) -> int | None:
        """Index of the block a parameter (or module) name belongs to, or None."""
        prefix = self.blocks_name + "."
        if not param_name.startswith(prefix):
            return None
        head = param_name[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def describe(self, param_name: str) -> str:
        """Where a parameter sits, for messages: "block 3", "embeddings", "pooler", "head" (or "?")."""
        try:
            group = self.group_of(param_name)
        except Exception:  # noqa: BLE001 - naming only
            return "?"
        return f"block {group.split('.', 1)[1]}" if group.startswith("layer.") else group

    def group_of(self, param_name: str) -> str:
        """'embeddings', 'layer.<l>', 'pooler' or 'head' for a parameter name of the task model."""
        layer = self.layer_of(param_name)
        if layer is not None:
            return f"layer.{layer}"
        if self.final_norm_name and _within(param_name, self.final_norm_name):
            return f"layer.{self.num_layers - 1}"
        if self.pooler_name and _within(param_name, self.pooler_name):
            return POOLER
        if self.backbone_name == "" or _within(param_name, self.backbone_name):
            return EMBEDDINGS
        return HEAD

    def groups(self, model: nn.Module, *, trainable_only: bool = False) -> dict[str, list[str]]:
        """Parameter names per group, in the order embeddings, layer.0..layer.L-1, pooler, head."""
        out: dict[str, list[str]] = {EMBEDDINGS: []}
        out.update({f"layer.{l}": [] for l in range(self.num_layers)})
        out[POOLER] = []
        out[HEAD] = []
        for name, p in model.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            out[self.group_of(name)].append(name)
        return out

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_name)


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _within(name: str, module_name: str) -> bool:
    return name == module_name or name.startswith(module_name + ".")


def _backbone(model: nn.Module) -> tuple[str, nn.Module]:
    prefix = getattr(model, "base_model_prefix", None)
    if prefix and hasattr(model, prefix) and isinstance(getattr(model, prefix), nn.Module):
        return prefix, getattr(model, prefix)
    return "", model


def _module_lists(root: nn.Module, root_name: str) -> Iterator[tuple[str, nn.ModuleList]]:
    for name, mod in root.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            yield (f"{root_name}.{name}" if root_name and name else root_name or name), mod


def map_layers(model: nn.Module) -> LayerMap:
    """Find the embeddings, blocks, pooler and head of ``model`` (an HF encoder, with or without a head).

    Raises UnsupportedArchitectureError naming what was found when no block list can be identified,
    or when the architecture shares parameters between layers (ALBERT).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type in _SHARED_LAYER_TYPES:
        raise UnsupportedArchitectureError(
            f"{model_type}: its transformer layers share one set of parameters, so layers cannot be scored or "
            "tuned separately"
        )
    backbone_name, backbone = _backbone(model)

    candidates = [
        (name, ml)
        for name, ml in _module_lists(backbone, backbone_name)
        if len({type(m) for m in ml}) == 1 and _has_params(ml[0])
    ]
    if not candidates:
        found = sorted({type(m).__name__ for m in backbone.children()})
        raise UnsupportedArchitectureError(
            f"cannot find the transformer blocks of {type(model).__name__} ({model_type}): no list of identical "
            f"parameterised modules inside the backbone; its children are {found}"
        )
    blocks_name, blocks = max(candidates, key=lambda c: (len(c[1]), -c[0].count(".")))
    expected = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
    if expected is not None and expected != len(blocks):
        raise UnsupportedArchitectureError(
            f"{model_type}: found {len(blocks)} blocks at {blocks_name!r} but the config says {expected} layers; "
            "layers that share parameters cannot be scored separately"
        )

    embeddings_name = _embeddings_name(model, backbone, backbone_name, blocks_name)
    pooler = getattr(backbone, "pooler", None)
    pooler_name = (f"{backbone_name}.pooler" if backbone_name else "pooler") if isinstance(pooler, nn.Module) else None
    head_names = tuple(
        name for name, child in model.named_children() if backbone_name and name != backbone_name and _has_params(child)
    )
    final_norm_name = _final_norm_name(backbone, backbone_name, blocks_name, embeddings_name, pooler_name)
    return LayerMap(
        model_type=model_type,
        num_layers=len(blocks),
        backbone_name=backbone_name,
        embeddings_name=embeddings_name,
        blocks_name=blocks_name,
        pooler_name=pooler_name,
        head_names=head_names,
        final_norm_name=final_norm_name,
    )


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("Norm", "RMSNorm"))


def _final_norm_name(backbone: nn.Module, backbone_name: str, blocks_name: str, embeddings_name: str,
                     pooler_name: str | None) -> str | None:
    """The backbone's own norm after the blocks (``norm`` of Llama/Qwen2, ``final_norm`` of ModernBERT), if any.

    By structure: the one parameterised normalisation module among the backbone's direct children that is
    neither the embeddings, nor the container of the blocks, nor the pooler. (Norms inside the encoder,
    such as DeBERTa's relative-embedding LayerNorm, are not direct children and are not considered.)
    """
    found = []
    for name, child in backbone.named_children():
        qualified = f"{backbone_name}.{name}" if backbone_name else name
        if qualified in (embeddings_name, pooler_name) or _within(blocks_name, qualified):
            continue
        if _is_norm(child) and _has_params(child):
            found.append(qualified)
    return found[0] if len(found) == 1 else None


def _embeddings_name(model: nn.Module, backbone: nn.Module, backbone_name: str, blocks_name: str) -> str:
    get_emb = getattr(model, "get_input_embeddings", None)
    table = get_emb() if callable(get_emb) else None
    for name, child in backbone.named_children():
        qualified = f"{backbone_name}.{name}" if backbone_name else name
        if _within(blocks_name, qualified):
            continue
        if table is not None and any(m is table for m in child.modules()):
            return qualified
        if table is None and any(isinstance(m, nn.Embedding) for m in child.modules()):
            return qualified
    raise UnsupportedArchitectureError(
        f"cannot find the embeddings of {type(model).__name__}: no backbone child outside {blocks_name!r} holds the "
        "input embedding table"
    )
