"""Tuning plans: how every block, the embeddings, the pooler and the head are tuned, and where the head reads.

A :class:`Plan` holds one :class:`Tuning` per block (0..L-1) plus one each for embeddings, pooler and head,
and ``head_layer``: the block whose output the classification head reads (blocks above it are removed from
the model, Xie et al. appendix B). Tuning kinds:

========  =========================================================================================
frozen    nothing trained
full      every parameter of the part
bitfit    the biases of the listed sub-layers (``biases``; all sub-layers when empty) -- BitFit
lora      LoRA (``lora``: rank, alpha, which matrices) on the attention matrices, plus the biases of
          the sub-layers in ``biases`` (SPAFIT's FT-I / FT-II)
adapter   Houlsby bottleneck adapters (``adapter_size``) after the attention output and after the FFN
          output, plus the block's LayerNorm parameters (Xie et al. B.2)
========  =========================================================================================

Unless a plan says otherwise the classification head is trained and the pooler is not.

Layer indices are 0-based block indices, the same as in scores.json (``layers[l]`` is block ``l``). Xie et
al. number layers 1..L; their ``(l_bottom, l_top, l_head)`` = (1, L, L) is our (0, L-1, L-1).

Strategies (``build_plan(name, ...)``; see :data:`STRATEGIES`)
----------------------------------------------------------------
``full``, ``bitfit`` (all biases: embeddings, blocks, pooler), ``lora-i`` (query, key, value),
``lora-ii`` (+ attention output dense); ``fisher-top-K`` / ``fisher-bottom-K`` (K blocks with the highest /
lowest Fisher score; needs a Fisher scores.json), ``top-K`` / ``bottom-K`` (any scores.json, respecting its
``higher_is_better``); ``layers-B-T-H`` (Xie's triple, 0-based); ``lstar-down-N`` = (l*-N+1, l*, L-1) and
``lstar-down-N-trunc`` = (l*-N+1, l*, l*); ``lstar-up`` = (l*+1, L-1, L-1); ``lstar-prefix`` = (0, l*, l*)
(l* from a variability scores.json: its top-level ``l_star``, else its best-ranked block);
``position-top-K`` = (L-K, L-1, L-1); ``middle-N`` / ``middle-N-trunc`` = (m-N+1, m, L-1) / (.., m, m) with
m = L // 2 (Xie's l_mid = 13 of 24, 1-based); ``random-K`` / ``random-K-sS`` (K blocks drawn at random,
draw S: the control for score-selected blocks); ``spafit-N1-N2-i`` / ``spafit-N1-N2-ii``.
Layer-selecting strategies tune the selected blocks with ``tuner`` (``full`` by default, ``adapter`` for
adapter-tuning, or ``bitfit`` / ``lora``).

SPAFIT groups (Arora & Wang, section 3.2, Tables 1 and 2)
----------------------------------------------------------
``spafit-N1-N2-{i,ii}`` holds, with 0-based block indices,

- group 1 = blocks 0..N1 (N1 + 1 blocks): frozen;
- group 2 = blocks N1+1..N2: BitFit on all sub-layers (every bias of the block, LayerNorm biases included);
- group 3 = blocks N2+1..L-1: LoRA-I (query, key, value) or LoRA-II (+ attention.output.dense), r = 64,
  alpha = 128, plus the biases of the intermediate and output sub-layers (intermediate.dense,
  output.dense, output.LayerNorm); the attention biases of group 3 stay frozen.

Why: this is the only reading of the groups that reproduces every SPAFIT row of Table 2 for
BERT-large-cased. An exhaustive search over group boundaries ([0, N1) vs [0, N1], [N1, N2) vs (N1, N2]),
bias sets (dense biases only / plus LayerNorm biases / plus LayerNorm weights) and head parameters (none,
classifier for 1, 2 or 3 labels, with or without the pooler) has this as its unique solution. Per block of
BERT-large: LoRA r=64 adds 2*64*1024 = 131,072 per matrix; all biases are 11,264; the intermediate/output
biases 6,144. SPAFIT-4-9-I: group 1 = blocks 0..4, group 2 = blocks 5..9: 5 * 11,264 = 56,320, group 3 =
blocks 10..23: 14 * (3 * 131,072 + 6,144) = 5,591,040, plus the classifier 3,075: 5,650,435 -> 5.65 M. The classifier counted is a 3-label head (MNLI's; 1024 * 3 + 3), and the pooler is frozen: with a
2-label head SPAFIT-4-9-II would be 7.48 M, not 7.49 M, and LoRA-II 12.58 M, not 12.59 M. Full fine-tuning
(333.58 M) counts everything, pooler included; LoRA-I / LoRA-II count LoRA matrices plus that classifier.

Table 2's "Full BitFit 31.52 M" cannot be reproduced by any set of biases: all biases of BERT-large are
0.27 M; 31.5 M needs the 29.7 M word-embedding table to be trained. Our ``bitfit`` trains all biases
(275,459 parameters with the 3-label head), as BitFit is defined; the test records the discrepancy.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

from fastsel.plans.plan import FROZEN, FULL, LoraSpec, Plan, PlanError, Tuning
from fastsel.scores.layer_scores import LayerScores

__all__ = ["StrategyArgs", "Strategy", "STRATEGIES", "TUNERS", "register_strategy", "strategy_names", "find_strategy",
           "check_tuner", "build_plan", "triple_plan", "l_star"]


@dataclass(frozen=True)
class StrategyArgs:
    """What a strategy builder gets: the number of blocks, optional scores, and how to tune selections."""

    num_layers: int
    scores: LayerScores | None = None
    tuner: str = "full"  # how selected blocks are tuned: full | adapter | bitfit | lora
    lora: LoraSpec = LoraSpec()
    adapter_size: int = 256
    task: str = ""  # the task the plan is for: random-K draws depend on it (a control must vary with the task)


@dataclass(frozen=True)
class Strategy:
    """A family of plans named by ``pattern`` (a regex with named groups, matched in full); ``name`` shows it."""

    name: str
    pattern: str
    build: Callable[[StrategyArgs, dict[str, str]], Plan]
    needs: str | None = None  # None | "scores" | "fisher" | "variability"
    help: str = ""
    takes_tuner: bool = True  # False: the strategy sets its own tuning (bitfit, LoRA, SPAFIT); --tuner does not apply


STRATEGIES: list[Strategy] = []

TUNERS = ("full", "adapter", "bitfit", "lora")


def register_strategy(strategy: Strategy) -> Strategy:
    if any(s.pattern == strategy.pattern for s in STRATEGIES):
        raise ValueError(f"fastsel: strategy {strategy.pattern!r} registered twice")
    STRATEGIES.append(strategy)
    return strategy


def strategy_names() -> list[str]:
    """Human-readable names of the registered strategies (patterns with K/N placeholders)."""
    return [s.name for s in STRATEGIES]


def find_strategy(name: str) -> tuple[Strategy, dict[str, str]]:
    for s in STRATEGIES:
        m = re.fullmatch(s.pattern, name.lower())
        if m:
            return s, m.groupdict()
    raise PlanError(f"fastsel: unknown strategy {name!r}; known: {', '.join(strategy_names())}")


def check_tuner(name: str, tuner: str) -> None:
    """PlanError (one line) for a tuner that strategy ``name`` would ignore, or an unknown one."""
    if tuner not in TUNERS:
        raise PlanError(f"fastsel: unknown tuner {tuner!r}; choose from {TUNERS}")
    strategy, _ = find_strategy(name)
    if tuner != "full" and not strategy.takes_tuner:
        chooses = ", ".join(s.name for s in STRATEGIES if s.takes_tuner)
        raise PlanError(f"fastsel: --tuner {tuner} does not apply to strategy {name!r}, which sets its own tuning; "
                        f"--tuner applies to the layer-selecting strategies ({chooses}): leave --tuner out")


def build_plan(
    name: str,
    num_layers: int,
    *,
    scores: LayerScores | None = None,
    tuner: str = "full",
    lora: LoraSpec | None = None,
    adapter_size: int = 256,
    task: str = "",
) -> Plan:
    """The plan of strategy ``name`` for a model of ``num_layers`` blocks (see the module docstring); ``task`` keys the
    random-K draws."""
    check_tuner(name, tuner)
    strategy, groups = find_strategy(name)
    if strategy.needs is not None:
        if scores is None:
            raise PlanError(f"fastsel: strategy {name!r} needs a {strategy.needs} scores.json (--scores)")
        if strategy.needs in ("fisher", "variability") and scores.metric != strategy.needs:
            raise PlanError(f"fastsel: strategy {name!r} needs {strategy.needs} scores, got {scores.metric!r} scores")
        if len(scores.layers) != num_layers:
            raise PlanError(f"fastsel: the scores cover {len(scores.layers)} layers but the model has {num_layers}")
    args = StrategyArgs(num_layers, scores, tuner, lora or LoraSpec(), adapter_size, task.lower())
    plan = strategy.build(args, groups)
    plan.strategy = name.lower() if tuner == "full" else f"{name.lower()}+{tuner}"
    if scores is not None and strategy.needs is not None:
        plan.details.setdefault("scores", {"metric": scores.metric, "model": scores.model, "task": scores.task,
                                           "ranking": scores.ranking})
    return plan


def _selected(args: StrategyArgs) -> Tuning:
    if args.tuner == "full":
        return FULL
    if args.tuner == "adapter":
        return Tuning("adapter", adapter_size=args.adapter_size)
    if args.tuner == "bitfit":
        return Tuning("bitfit")
    return Tuning("lora", lora=args.lora)


def _select(args: StrategyArgs, layers: list[int], head_layer: int | None = None, **details: Any) -> Plan:
    L = args.num_layers
    bad = [l for l in layers if not 0 <= l < L]
    if bad:
        raise PlanError(f"fastsel: layers {bad} out of range: the model has blocks 0..{L - 1}")
    chosen = _selected(args)
    blocks = [chosen if l in set(layers) else FROZEN for l in range(L)]
    return Plan(blocks, head_layer=None if head_layer in (None, L - 1) else head_layer,
                details={"layers": sorted(layers), **details})


def triple_plan(args: StrategyArgs, bottom: int, top: int, head: int, **details: Any) -> Plan:
    """Xie et al.'s (l_bottom, l_top, l_head), 0-based: tune blocks bottom..top, head reads block ``head``."""
    L = args.num_layers
    for what, v in (("l_bottom", bottom), ("l_top", top), ("l_head", head)):
        if not 0 <= v < L:
            raise PlanError(f"fastsel: {what}={v} out of range: the model has blocks 0..{L - 1}")
    if bottom > top:
        raise PlanError(f"fastsel: l_bottom={bottom} > l_top={top}")
    if top > head:
        raise PlanError(f"fastsel: l_top={top} > l_head={head}: tuned blocks above the head would be removed")
    return _select(args, list(range(bottom, top + 1)), head, triple=[bottom, top, head], **details)


def _k(groups: dict[str, str], key: str = "k") -> int:
    k = int(groups[key])
    if k < 1:
        raise PlanError(f"fastsel: {key.upper()} must be >= 1, got {k}")
    return k


def _ranked(args: StrategyArgs, groups: dict[str, str], best: bool) -> Plan:
    assert args.scores is not None
    k = _k(groups)
    if k > args.num_layers:
        raise PlanError(f"fastsel: K={k} > the number of blocks ({args.num_layers})")
    ranking = args.scores.ranking
    layers = ranking[:k] if best else ranking[::-1][:k]
    return _select(args, layers, k=k, by=args.scores.metric, order="best" if best else "worst")


def l_star(scores: LayerScores) -> int:
    """The best-specialised block: the scores' top-level ``l_star`` if present, else the best-ranked block."""
    value = scores.info.get("l_star")
    l = int(value) if value is not None else scores.ranking[0]
    if not 0 <= l < len(scores.layers):
        raise PlanError(f"fastsel: l_star={l} out of range 0..{len(scores.layers) - 1}")
    return l


def _lstar_down(args: StrategyArgs, groups: dict[str, str]) -> Plan:
    assert args.scores is not None
    n, ls = _k(groups, "n"), l_star(args.scores)
    if n > ls + 1:
        raise PlanError(f"fastsel: lstar-down-{n} needs {n} blocks at or below l*={ls}, only {ls + 1} exist")
    head = ls if groups.get("trunc") else args.num_layers - 1
    return triple_plan(args, ls - n + 1, ls, head, l_star=ls)


def _lstar_up(args: StrategyArgs, groups: dict[str, str]) -> Plan:
    assert args.scores is not None
    ls, L = l_star(args.scores), args.num_layers
    if ls == L - 1:
        raise PlanError(f"fastsel: lstar-up: l*={ls} is the top block, nothing lies above it")
    return triple_plan(args, ls + 1, L - 1, L - 1, l_star=ls)


def _lstar_prefix(args: StrategyArgs, groups: dict[str, str]) -> Plan:
    assert args.scores is not None
    ls = l_star(args.scores)
    return triple_plan(args, 0, ls, ls, l_star=ls)


def _middle(args: StrategyArgs, groups: dict[str, str]) -> Plan:
    n, mid = _k(groups, "n"), args.num_layers // 2
    if n > mid + 1:
        raise PlanError(f"fastsel: middle-{n} needs {n} blocks at or below the middle block {mid}")
    return triple_plan(args, mid - n + 1, mid, mid if groups.get("trunc") else args.num_layers - 1, l_mid=mid)


def _position_top(args: StrategyArgs, groups: dict[str, str]) -> Plan:
    k, L = _k(groups), args.num_layers
    if k > L:
        raise PlanError(f"fastsel: K={k} > the number of blocks ({L})")
    return triple_plan(args, L - k, L - 1, L - 1)


def _random(args: StrategyArgs, groups: dict[str, str]) -> Plan:
    # A control for score-selected blocks: K blocks drawn uniformly without replacement, keyed by (task, L, K, S):
    # reproducible, and different for every task (a draw keyed by (L, K, S) alone compared one fixed block set
    # with Fisher on every task); "averaged over draws" means averaging over S.
    k, L, draw = _k(groups), args.num_layers, int(groups.get("s") or 0)
    if k > L:
        raise PlanError(f"fastsel: K={k} > the number of blocks ({L})")
    layers = sorted(random.Random(f"fastsel-random-{args.task}-{L}-{k}-{draw}").sample(range(L), k))
    return _select(args, layers, k=k, draw=draw, task=args.task)


def _explicit(args: StrategyArgs, groups: dict[str, str]) -> Plan:
    return triple_plan(args, int(groups["b"]), int(groups["t"]), int(groups["h"]))


def _full(args: StrategyArgs, groups: dict[str, str]) -> Plan:
    if args.tuner == "full":  # conventional full fine-tuning: every parameter, pooler included
        return Plan([FULL] * args.num_layers, embeddings=FULL, pooler=FULL)
    return _select(args, list(range(args.num_layers)))  # e.g. full adapter-tuning


def _bitfit(args: StrategyArgs, groups: dict[str, str]) -> Plan:
    b = Tuning("bitfit")
    return Plan([b] * args.num_layers, embeddings=b, pooler=b)


def _lora_all(args: StrategyArgs, groups: dict[str, str]) -> Plan:
    matrices = ("query", "key", "value") if groups["v"] == "i" else ("query", "key", "value", "attention_output")
    spec = replace(args.lora, matrices=matrices)
    return Plan([Tuning("lora", lora=spec)] * args.num_layers)


def _spafit(args: StrategyArgs, groups: dict[str, str]) -> Plan:
    n1, n2, L = int(groups["n1"]), int(groups["n2"]), args.num_layers
    if not 0 <= n1 <= n2 < L:
        raise PlanError(f"fastsel: spafit-{n1}-{n2} needs 0 <= N1 <= N2 < {L} (group 1 = blocks 0..N1, "
                        f"group 2 = N1+1..N2, group 3 = N2+1..{L - 1})")
    matrices = ("query", "key", "value") if groups["v"] == "i" else ("query", "key", "value", "attention_output")
    g3 = Tuning("lora", biases=("intermediate", "output"), lora=replace(args.lora, matrices=matrices))
    g2 = Tuning("bitfit")
    blocks = [FROZEN if l <= n1 else g2 if l <= n2 else g3 for l in range(L)]
    return Plan(blocks, details={"groups": {"1": [0, n1], "2": [n1 + 1, n2], "3": [n2 + 1, L - 1]}})


for _s in [
    Strategy("full", r"full", _full, help="every parameter (with --tuner adapter: adapters in every block)"),
    Strategy("bitfit", r"bitfit", _bitfit, help="all biases (BitFit)", takes_tuner=False),
    Strategy("lora-{i,ii}", r"lora-(?P<v>ii|i)", _lora_all, help="LoRA on query/key/value (i) or + attention output dense (ii)",
             takes_tuner=False),
    Strategy("spafit-N1-N2-{i,ii}", r"spafit-(?P<n1>\d+)-(?P<n2>\d+)-(?P<v>ii|i)", _spafit, help="SPAFIT: frozen / BitFit / LoRA groups",
             takes_tuner=False),
    Strategy("fisher-top-K", r"fisher-top-(?P<k>\d+)", lambda a, g: _ranked(a, g, True), "fisher", "K blocks of highest Fisher score"),
    Strategy("fisher-bottom-K", r"fisher-bottom-(?P<k>\d+)", lambda a, g: _ranked(a, g, False), "fisher", "K blocks of lowest Fisher score"),
    Strategy("top-K", r"top-(?P<k>\d+)", lambda a, g: _ranked(a, g, True), "scores", "K best-ranked blocks of any scores"),
    Strategy("bottom-K", r"bottom-(?P<k>\d+)", lambda a, g: _ranked(a, g, False), "scores", "K worst-ranked blocks of any scores"),
    Strategy("lstar-down-N[-trunc]", r"lstar-down-(?P<n>\d+)(?P<trunc>-trunc)?", _lstar_down, "variability",
             "(l*-N+1, l*, L-1), or head at l* with -trunc"),
    Strategy("lstar-up", r"lstar-up", _lstar_up, "variability", "(l*+1, L-1, L-1)"),
    Strategy("lstar-prefix", r"lstar-prefix", _lstar_prefix, "variability", "(0, l*, l*)"),
    Strategy("position-top-K", r"position-top-(?P<k>\d+)", _position_top, help="the top K blocks (L-K, L-1, L-1)"),
    Strategy("random-K[-sS]", r"random-(?P<k>\d+)(?:-s(?P<s>\d+))?", _random,
             help="K blocks drawn at random (draw S, default 0): the control for score-selected blocks"),
    Strategy("middle-N[-trunc]", r"middle-(?P<n>\d+)(?P<trunc>-trunc)?", _middle, help="N blocks ending at the middle block L//2"),
    Strategy("layers-B-T-H", r"layers-(?P<b>\d+)-(?P<t>\d+)-(?P<h>\d+)", _explicit, help="explicit (l_bottom, l_top, l_head), 0-based"),
]:
    register_strategy(_s)
