"""The study's settings: the strategies compared (with their tuner and learning-rate family), the learning rates,
and the per-task values of a command-line option ("64,rte=128")."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[2]


# (reported name, fastsel strategy ({seed} = the run's seed), tuner, learning-rate family). Learning rates
# are fixed per family, not swept: the fewer trainable parameters, the larger the rate (as in Xie et al.
# B.4 / SPAFIT A.2). "adapters": Houlsby adapters in the top two blocks (the conventional top-K block
# choice with adapters instead of full tuning of the blocks); adapters in every block is "adapters-all".
STRATEGIES: list[tuple[str, str, str, str]] = [
    ("full", "full", "full", "full"),
    ("fisher-top-1", "fisher-top-1", "full", "blocks"),
    ("fisher-top-2", "fisher-top-2", "full", "blocks"),
    ("fisher-top-3", "fisher-top-3", "full", "blocks"),
    ("fisher-bottom-1", "fisher-bottom-1", "full", "blocks"),
    ("position-top-1", "position-top-1", "full", "blocks"),
    ("position-top-3", "position-top-3", "full", "blocks"),
    ("random-1", "random-1-s{seed}", "full", "blocks"),
    ("random-3", "random-3-s{seed}", "full", "blocks"),
    ("lstar-down-2", "lstar-down-2", "full", "blocks"),
    ("lstar-down-2-trunc", "lstar-down-2-trunc", "full", "blocks"),
    ("bitfit", "bitfit", "full", "bitfit"),
    ("lora-i", "lora-i", "full", "peft"),
    ("spafit-1-3-i", "spafit-1-3-i", "full", "peft"),
    ("adapters", "position-top-2", "adapter", "peft"),
]
# Only when asked for by --strategies.
EXTRA_STRATEGIES: list[tuple[str, str, str, str]] = [
    ("adapters-all", "full", "adapter", "peft"),
    ("position-top-2", "position-top-2", "full", "blocks"),
    ("fisher-bottom-3", "fisher-bottom-3", "full", "blocks"),
]
DEFAULT_LR = {"full": 5e-5, "blocks": 1e-4, "bitfit": 1e-3, "peft": 5e-4}


def parse_per_task(text: str | int, cast=int) -> dict[str, Any]:
    """``"64"`` -> {"*": 64}; ``"64,rte=128"`` -> {"*": 64, "rte": 128}; ``"sst2=8000,2000"`` likewise."""
    out: dict[str, Any] = {}
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.rpartition("=")
        out[key.strip().lower() or "*"] = cast(value)
    if not out:
        raise ValueError(f"empty per-task value {text!r}")
    return out


def for_task(values: Mapping[str, Any], task: str) -> Any:
    if task.lower() in values:
        return values[task.lower()]
    if "*" in values:
        return values["*"]
    raise ValueError(f"no value for task {task!r} in {dict(values)} (give a default without 'task=')")


def strategy_table(names: Iterable[str] = ()) -> list[tuple[str, str, str, str]]:
    """The built-in list, or the named subset of it (and of EXTRA_STRATEGIES), in the built-in order."""
    wanted = [n for n in names if n]
    if not wanted:
        return list(STRATEGIES)
    known = {s[0]: s for s in STRATEGIES + EXTRA_STRATEGIES}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {list(known)}")
    return [s for s in STRATEGIES + EXTRA_STRATEGIES if s[0] in wanted]


def scores_kind(strategy: str) -> str | None:
    """Which scores file a fastsel strategy reads: fisher, variability or none."""
    if strategy.startswith(("fisher-", "top-", "bottom-")):
        return "fisher"
    if strategy.startswith("lstar"):
        return "variability"
    return None


def rank_epochs_for(epochs: int, wanted: Sequence[int]) -> list[int]:
    return [e for e in wanted if 1 <= e <= epochs]
