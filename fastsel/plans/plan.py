"""Tuning plans: how every block, the embeddings, pooler and head are tuned, and where the head reads.

See :mod:`fastsel.plans` for the vocabulary; strategies that build plans live in
:mod:`fastsel.plans.strategies`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

from fastsel.hf.arch_names import arch_names
from fastsel.utils.atomic import atomic_write_json

__all__ = ["KINDS", "SUBLAYERS", "LORA_MATRICES", "PlanError", "LoraSpec", "Tuning", "FROZEN", "FULL", "Plan"]


KINDS = ("frozen", "full", "bitfit", "lora", "adapter")

SUBLAYERS = ("attention", "intermediate", "output")

LORA_MATRICES = ("query", "key", "value", "attention_output")

_PART_KINDS = ("frozen", "full", "bitfit")  # embeddings, pooler, head


class PlanError(ValueError):
    """A plan or strategy that cannot be built or applied (bad layer, bad triple, unknown strategy, ...)."""


@dataclass(frozen=True)
class LoraSpec:
    """LoRA on the listed attention matrices: rank ``r``, scaling ``alpha / r``, dropout on the input."""

    r: int = 64
    alpha: float = 128
    matrices: tuple[str, ...] = ("query", "key", "value")
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "matrices", tuple(self.matrices))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise PlanError(f"fastsel: LoRA rank (--lora-r) must be >= 1, got {self.r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (0 < self.alpha < math.inf):
            raise PlanError(f"fastsel: LoRA alpha (--lora-alpha) must be a finite number > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise PlanError(f"fastsel: LoRA dropout (--lora-dropout) must be in [0, 1), got {self.dropout}")
        if not self.matrices:
            raise PlanError("fastsel: LoRA needs at least one matrix")
        bad = [m for m in self.matrices if m not in LORA_MATRICES]
        if bad:
            raise PlanError(f"fastsel: unknown LoRA matrices {bad}; choose from {LORA_MATRICES}")


@dataclass(frozen=True)
class Tuning:
    """How one part (a block, the embeddings, the pooler or the head) is tuned; see the module docstring."""

    kind: str = "frozen"
    biases: tuple[str, ...] = ()  # bitfit: sub-layers (empty = all); lora: extra BitFit sub-layers
    lora: LoraSpec | None = None
    adapter_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "biases", tuple(self.biases))
        if self.kind not in KINDS:
            raise PlanError(f"fastsel: unknown tuning kind {self.kind!r}; choose from {KINDS}")
        bad = [b for b in self.biases if b not in SUBLAYERS]
        if bad:
            raise PlanError(f"fastsel: unknown sub-layers {bad}; choose from {SUBLAYERS}")
        if self.biases and self.kind not in ("bitfit", "lora"):
            raise PlanError(f"fastsel: 'biases' only applies to bitfit and lora tuning, not {self.kind!r}")
        if (self.kind == "lora") != (self.lora is not None):
            raise PlanError("fastsel: a LoRA spec is needed for kind 'lora' and only for it")
        if self.kind == "adapter":
            if self.adapter_size is None or self.adapter_size < 1:
                raise PlanError(f"fastsel: adapter tuning needs adapter_size >= 1, got {self.adapter_size}")
        elif self.adapter_size is not None:
            raise PlanError("fastsel: adapter_size only applies to kind 'adapter'")

    @property
    def trains(self) -> bool:
        return self.kind != "frozen"

    def short(self) -> str:
        if self.kind == "lora":
            assert self.lora is not None
            s = f"lora(r={self.lora.r},{'+'.join(self.lora.matrices)})"
            return s + (f"+bias({','.join(self.biases)})" if self.biases else "")
        if self.kind == "bitfit" and self.biases:
            return f"bitfit({','.join(self.biases)})"
        if self.kind == "adapter":
            return f"adapter({self.adapter_size})"
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.biases:
            d["biases"] = list(self.biases)
        if self.lora is not None:
            d["lora"] = {**asdict(self.lora), "matrices": list(self.lora.matrices)}
        if self.adapter_size is not None:
            d["adapter_size"] = self.adapter_size
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> "Tuning":
        if isinstance(d, str):
            d = {"kind": d}
        unknown = set(d) - {"kind", "biases", "lora", "adapter_size"}
        if unknown:
            raise PlanError(f"fastsel: unknown tuning keys {sorted(unknown)}")
        lora = d.get("lora")
        return cls(kind=d.get("kind", "frozen"), biases=tuple(d.get("biases", ())),
                   lora=LoraSpec(**lora) if lora is not None else None, adapter_size=d.get("adapter_size"))


FROZEN = Tuning("frozen")

FULL = Tuning("full")


@dataclass
class Plan:
    """One tuning per block (0..L-1) plus embeddings, pooler and head; the head reads block ``head_layer``.

    ``head_layer=None`` means the top block (no truncation). Blocks above ``head_layer`` are removed
    from the model and must be frozen in the plan. ``trainable_params`` / ``params_by_group`` are filled
    by :meth:`with_counts` (head included in the total).
    """

    blocks: list[Tuning]
    embeddings: Tuning = FROZEN
    pooler: Tuning = FROZEN
    head: Tuning = FULL
    head_layer: int | None = None
    strategy: str = "custom"
    details: dict[str, Any] = field(default_factory=dict)
    trainable_params: int | None = None
    params_by_group: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.blocks = [b if isinstance(b, Tuning) else Tuning.from_dict(b) for b in self.blocks]
        self.validate()

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def head_at(self) -> int:
        return self.num_layers - 1 if self.head_layer is None else self.head_layer

    @property
    def truncated(self) -> bool:
        return self.head_at < self.num_layers - 1

    def tuned_layers(self, kind: str | None = None) -> list[int]:
        return [l for l, t in enumerate(self.blocks) if t.trains and (kind is None or t.kind == kind)]

    @property
    def first_trained_layer(self) -> int | None:
        """Lowest block that trains anything (None when no block does)."""
        tuned = self.tuned_layers()
        return tuned[0] if tuned else None

    @property
    def lora_spec(self) -> LoraSpec | None:
        specs = {t.lora for t in self.blocks if t.lora is not None}
        return next(iter(specs)) if specs else None

    def validate(self) -> None:
        L = self.num_layers
        if L < 1:
            raise PlanError("fastsel: a plan needs at least one block")
        if self.head_layer is not None and not 0 <= self.head_layer < L:
            raise PlanError(f"fastsel: head layer {self.head_layer} out of range: the model has blocks 0..{L - 1}")
        above = [l for l in range(self.head_at + 1, L) if self.blocks[l].trains]
        if above:
            raise PlanError(f"fastsel: blocks {above} are tuned but lie above the head layer {self.head_at}, "
                            "which removes them from the model")
        for part in ("embeddings", "pooler", "head"):
            t = getattr(self, part)
            if t.kind not in _PART_KINDS:
                raise PlanError(f"fastsel: the {part} can be tuned {_PART_KINDS}, not {t.kind!r}")
            if t.biases:
                raise PlanError(f"fastsel: the {part} has no sub-layers; bitfit there trains all its biases")
        specs = {t.lora for t in self.blocks if t.lora is not None}
        if len(specs) > 1:
            raise PlanError(f"fastsel: all LoRA blocks of a plan must share one LoRA spec, got {len(specs)}")

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "strategy": self.strategy,
            "num_layers": self.num_layers,
            "head_layer": self.head_at,
            "blocks": [t.to_dict() for t in self.blocks],
            "embeddings": self.embeddings.to_dict(),
            "pooler": self.pooler.to_dict(),
            "head": self.head.to_dict(),
            "details": self.details,
        }
        if self.trainable_params is not None:
            d["trainable_params"] = self.trainable_params
            d["params_by_group"] = self.params_by_group
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        known = {"strategy", "num_layers", "head_layer", "blocks", "embeddings", "pooler", "head", "details",
                 "trainable_params", "params_by_group"}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"fastsel: unknown plan keys {sorted(unknown)}")
        if "blocks" not in d:
            raise PlanError("fastsel: not a plan: missing key 'blocks'")
        blocks = [Tuning.from_dict(b) for b in d["blocks"]]
        if "num_layers" in d and d["num_layers"] != len(blocks):
            raise PlanError(f"fastsel: plan says num_layers={d['num_layers']} but lists {len(blocks)} blocks")
        head_layer = d.get("head_layer")
        return cls(
            blocks=blocks,
            embeddings=Tuning.from_dict(d.get("embeddings", "frozen")),
            pooler=Tuning.from_dict(d.get("pooler", "frozen")),
            head=Tuning.from_dict(d.get("head", "full")),
            head_layer=None if head_layer is None or head_layer == len(blocks) - 1 else int(head_layer),
            strategy=d.get("strategy", "custom"),
            details=d.get("details", {}),
            trainable_params=d.get("trainable_params"),
            params_by_group=d.get("params_by_group"),
        )

    def to_json(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Plan":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    # -- counts and display --------------------------------------------------------------------------

    def with_counts(self, counts: Mapping[str, int]) -> "Plan":
        """A copy carrying ``counts`` (from :func:`fastsel.tuners.apply.count_trainable`, which applies the plan to a
        model or to a config's meta-device model) as ``trainable_params`` / ``params_by_group``."""
        if not isinstance(counts, Mapping) or "total" not in counts:
            raise TypeError("fastsel: Plan.with_counts takes the counts of fastsel.tuners.apply.count_trainable(plan, model_or_config)")
        return replace(self, trainable_params=int(counts["total"]), params_by_group=dict(counts))

    def table(self) -> str:
        """Per group: how it is tuned and its trainable parameters (after :meth:`with_counts`)."""
        counts = self.params_by_group or {}
        rows = [("embeddings", self.embeddings.short())]
        for l, t in enumerate(self.blocks):
            rows.append((f"layer.{l}", "removed" if l > self.head_at else t.short()))
        rows += [("pooler", self.pooler.short()), ("head", self.head.short() + f" (reads block {self.head_at})")]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"plan {self.strategy}: {self.num_layers} blocks, head on block {self.head_at}"]
        lines.append(f"{'group'.ljust(w0)}  {'tuning'.ljust(w1)}  trainable")
        for g, how in rows:
            n = counts.get(g)
            lines.append(f"{g.ljust(w0)}  {how.ljust(w1)}  {'' if n is None else f'{n:,}'}")
        if self.trainable_params is not None:
            total = counts.get("all_params")
            frac = f" of {total:,} ({100 * self.trainable_params / total:.3f}%)" if total else ""
            lines.append(f"{'total'.ljust(w0)}  {''.ljust(w1)}  {self.trainable_params:,}{frac}")
        return "\n".join(lines)

    # -- PEFT export ------------------------------------------------------------------------------------

    def to_peft(self, model_type: str = "bert", layers_pattern: str = "layer",
                head_names: Sequence[str] = ("classifier",)) -> dict[str, Any]:
        """``peft.LoraConfig`` keyword arguments for this plan.

        LoRA blocks export their spec. A layer-selecting plan without LoRA exports its tuned blocks
        as ``layers_to_transform`` with LoRA on query/key/value (r=8, alpha=16) so that the selection can be
        used with PEFT directly. The head (``head_names``: the model's head modules, ``LayerMap.head_names``;
        HF's sequence-classification models call it "classifier") goes to ``modules_to_save``.
        """
        names = arch_names(model_type)
        spec = self.lora_spec
        layers = self.tuned_layers("lora") if spec is not None else self.tuned_layers()
        if spec is None:
            spec = LoraSpec(r=8, alpha=16)
        if not layers:
            raise PlanError("fastsel: the plan tunes no block, so there is nothing to export to PEFT")
        return {
            "r": spec.r,
            "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout,
            "target_modules": [names.lora[m] for m in spec.matrices],
            "layers_to_transform": layers,
            "layers_pattern": layers_pattern,
            "modules_to_save": list(head_names) if self.head.trains else None,
        }
