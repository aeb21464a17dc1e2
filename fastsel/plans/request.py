"""What a tuning plan is built from (:class:`PlanRequest`): the strategy, its scores and how the chosen blocks are
tuned; the settings ``fastsel plan`` and ``fastsel finetune`` share (their flags are made from these fields)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from fastsel.plans.plan import LoraSpec
from fastsel.plans.strategies import TUNERS, strategy_names
from fastsel.utils.settings import JsonSettings, flag_of, setting

__all__ = ["PlanRequest", "lora_alpha_arg"]


def lora_alpha_arg(text: str) -> float | None:
    """--lora-alpha: a number, or 2*r (None: twice the rank)."""
    if text.replace(" ", "").lower() in ("2*r", "2r"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 2*r, not {text!r}") from None


def _strategy_help() -> str:  # strategies may be registered after this module
    return f"one of: {', '.join(strategy_names())}"


@dataclass(kw_only=True)
class PlanRequest(JsonSettings):
    """A strategy name (``top-k:3``, ``lstar-down``, ...), the scores.json it ranks by (when it needs one) and the
    tuning of the blocks it selects."""

    strategy: str | None = setting(None, _strategy_help)
    scores_path: str | None = setting(None, "scores.json for score-based strategies", flag="--scores")
    tuner: str = setting("full", "how layer-selecting strategies tune the selected blocks", choices=TUNERS)
    lora_r: int = setting(8, "LoRA rank")
    lora_alpha: float | None = setting(None, "LoRA alpha (the update is scaled by alpha/r); 2*r: twice --lora-r, "
                                       "whatever --lora-r is", type=lora_alpha_arg, shown="2*r")
    lora_dropout: float = setting(0.0, "dropout on the LoRA input")
    adapter_size: int = setting(256, "bottleneck width of the adapters (--tuner adapter)")

    def lora_spec(self) -> LoraSpec:
        """The LoRA of these settings (alpha None: twice the rank)."""
        alpha = 2 * self.lora_r if self.lora_alpha is None else self.lora_alpha
        return LoraSpec(r=self.lora_r, alpha=alpha, dropout=self.lora_dropout)

    def tuning_flags_given(self) -> dict[str, bool]:
        """{flag: set to other than its default} of the tuning flags (--tuner, --lora-*, --adapter-size)."""
        own = {f.name for f in fields(PlanRequest)} - {"strategy", "scores_path"}
        return {flag_of(f): getattr(self, f.name) != f.default for f in fields(PlanRequest) if f.name in own}
