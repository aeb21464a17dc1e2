"""Module names inside one block, per architecture family: which linear is the query, which sub-layer a
parameter belongs to, after which linear an adapter goes. Plans speak of logical names (``query``,
``attention``); this table turns them into a model's module paths.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from fastsel.hf.layer_map import UnsupportedArchitectureError

__all__ = ["ArchNames", "arch_names"]


@dataclass(frozen=True)
class ArchNames:
    """Module names inside one block (relative to the block) for one family of architectures."""

    lora: dict[str, str]  # logical matrix -> module path
    sublayers: dict[str, tuple[str, ...]]  # sub-layer -> module path prefixes
    attention_out: str  # linear after which the attention adapter goes
    ffn_out: str  # linear after which the FFN adapter goes

    def sublayer_of(self, rel_name: str) -> str | None:
        for sub, prefixes in self.sublayers.items():
            if any(rel_name.startswith(p + ".") or rel_name == p for p in prefixes):
                return sub
        return None


_BERT_LIKE = ArchNames(
    lora={"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
          "attention_output": "attention.output.dense"},
    sublayers={"attention": ("attention",), "intermediate": ("intermediate",), "output": ("output",)},
    attention_out="attention.output.dense",
    ffn_out="output.dense",
)

_ARCH_NAMES: dict[str, ArchNames] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": replace(_BERT_LIKE, lora={"query": "attention.self.query_proj", "key": "attention.self.key_proj",
                                            "value": "attention.self.value_proj",
                                            "attention_output": "attention.output.dense"}),
    "distilbert": ArchNames(
        lora={"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
              "attention_output": "attention.out_lin"},
        sublayers={"attention": ("attention", "sa_layer_norm"), "intermediate": ("ffn.lin1",),
                   "output": ("ffn.lin2", "output_layer_norm")},
        attention_out="attention.out_lin",
        ffn_out="ffn.lin2",
    ),
}


def arch_names(model_type: str) -> ArchNames:
    if model_type not in _ARCH_NAMES:
        raise UnsupportedArchitectureError(f"fastsel: no sub-layer names known for architecture {model_type!r}; "
                        f"supported: {sorted(_ARCH_NAMES)}")
    return _ARCH_NAMES[model_type]
