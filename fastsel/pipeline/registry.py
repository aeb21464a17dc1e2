"""The one registry of layer-scoring metrics.

A metric is one :class:`Metric` record: its in-memory ``run(ctx)``, its streamed ``consumer`` (a
:class:`BatchConsumer` factory fed by :func:`fastsel.pipeline.streamed.run_pass`), its CLI flags and help.
The metric drivers in :mod:`fastsel.pipeline.drivers` register themselves; this module imports none of them.
It sits below :mod:`fastsel.pipeline.config` and :mod:`fastsel.pipeline.context` (they import it, it imports
neither, not even for type hints): what it reads of a ``ScoreConfig`` is the :class:`HasOptions` protocol.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor

from fastsel.scores.confidence import DEFAULT_GROUPS
from fastsel.scores.layer_scores import LayerScores

__all__ = ["Metric", "METRICS", "register_metric", "BatchConsumer", "ConsumerFactory", "CONSUMERS",
           "register_consumer", "supports", "confidence_groups", "default_num_examples", "AUTOCAST", "option", "add_option_arguments",
           "options_of"]

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@runtime_checkable
class BatchConsumer(Protocol):
    """One metric's accumulator inside the shared pass.

    batch: dict of input_ids (B, T), attention_mask (B, T), token_type_ids, special_tokens_mask (B, T),
    labels (B,), index (B,) int64 global example positions. outputs: the model output of that batch
    (``hidden_states`` present when any consumer sets ``needs_hidden_states``).
    """

    name: str
    needs_backward: bool  # Fisher: True (the forward keeps its graph); class statistics: False
    needs_hidden_states: bool

    def capture(self, batch: Mapping[str, Tensor]) -> ContextManager[Any]:
        """Entered around the forward (and the consume calls) of each batch: hooks, or nullcontext()."""

    def consume(self, batch: Mapping[str, Tensor], outputs: Any) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def all_reduce(self, group: Any = None) -> None:
        """Combine this rank's statistics with every other rank's (called once, after the pass)."""

    def result(self) -> LayerScores: ...


# called with the run's fastsel.pipeline.context.PipelineContext (Any here: context.py imports this module)
ConsumerFactory = Callable[[Any], BatchConsumer]


class HasOptions(Protocol):
    """What :func:`confidence_groups` reads of a config: a :class:`fastsel.pipeline.config.ScoreConfig`."""

    @property
    def options(self) -> Mapping[str, Any]: ...


def supports(metric: str) -> bool:
    """Whether every metric of a comma-separated list has a streaming consumer."""
    return all(name in METRICS and METRICS[name].consumer is not None for name in metric.split(","))


def default_num_examples(metric: str) -> int | None:
    """The examples a comma-separated list of metrics is scored on by default: the largest of their
    ``default_examples`` (None when any of them wants all the data)."""
    wanted = [METRICS[name].default_examples for name in metric.split(",") if name in METRICS]
    return None if not wanted or any(w is None for w in wanted) else max(wanted)  # type: ignore[type-var]


def confidence_groups(cfg: HasOptions) -> int:
    """K of the ranking confidence (``options["confidence_groups"]``, default DEFAULT_GROUPS = 4; 0: none)."""
    return int(cfg.options.get("confidence_groups", DEFAULT_GROUPS))


def option(default: Any, help: str, *, choices: tuple | None = None, type: Callable | None = None, metavar: str | None = None) -> Any:
    """A field of a metric's options dataclass; its ``--flag`` (the field name with dashes) is made from it."""
    return field(default=default, metadata={"help": help, "choices": choices, "type": type, "metavar": metavar})


def add_option_arguments(parser: Any, options: type, taken: set[str] | None = None, only: Any = None) -> None:
    """One ``--flag`` per field of the options dataclass ``options`` (flags in ``taken`` are skipped: metrics share
    ``--pooling``; ``only``: the names of the fields to add, None: all); a bool field is a switch."""
    for f in fields(options):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        if taken is not None:
            if flag in taken:
                continue
            taken.add(flag)
        md = f.metadata
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", default=f.default, help=md.get("help"))
            continue
        kw = {k: md[k] for k in ("choices", "metavar") if md.get(k) is not None}
        conv = md.get("type") or (type(f.default) if f.default is not None else None)
        if conv is not None:
            kw["type"] = conv
        parser.add_argument(flag, default=f.default, help=md.get("help"), **kw)


def options_of(options: type, values: Mapping[str, Any]) -> Any:
    """The options dataclass of a metric from ``ScoreConfig.options`` (missing keys: the field defaults; unknown keys
    belong to other metrics and are ignored); validated by the dataclass."""
    known = {f.name for f in fields(options)}
    return options(**{k: v for k, v in values.items() if k in known and v is not None})


@dataclass(frozen=True)
class Metric:
    """A layer-scoring metric: ``run(ctx) -> LayerScores`` in memory, ``consumer(ctx)`` in the streamed pass, and
    ``options``, a dataclass of its settings (fields made with :func:`option`) whose fields are its CLI flags; their
    values land in ``ScoreConfig.options``. ``add_arguments`` adds hand-written flags instead (plug-ins)."""

    name: str
    run: Callable[[Any], LayerScores]  # called with a fastsel.pipeline.context.ScoringContext
    higher_is_better: bool = True
    needs_labels: bool = True
    classification_only: bool = False
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    help: str = ""
    plot: Callable[[LayerScores, str | Path], None] | None = None  # None: fastsel.scores.plot.plot_layer_scores
    options: type | None = None  # a dataclass of the metric's settings
    consumer: ConsumerFactory | None = None  # the streamed pass's accumulator (None: in-memory only)
    # examples `fastsel score` draws when --num-examples is not given (docs/sample_size.md); None: all of them
    default_examples: int | None = None


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    if metric.name in METRICS:
        raise ValueError(f"fastsel: metric {metric.name!r} registered twice")
    METRICS[metric.name] = metric
    return metric


def register_consumer(name: str, factory: ConsumerFactory) -> ConsumerFactory:
    """Attach a streamed consumer to metric ``name`` (registered before) that has none yet."""
    if name not in METRICS:
        raise ValueError(f"fastsel: register metric {name!r} (register_metric) before its consumer")
    if METRICS[name].consumer is not None:
        raise ValueError(f"fastsel: consumer for {name!r} registered twice")
    METRICS[name] = replace(METRICS[name], consumer=factory)
    return factory


class _Consumers(MappingABC):
    """Read-only view {metric name: consumer factory} of the metrics that stream (derived from METRICS)."""

    def __getitem__(self, name: str) -> ConsumerFactory:
        metric = METRICS[name]
        if metric.consumer is None:
            raise KeyError(name)
        return metric.consumer

    def __iter__(self):
        return (n for n, m in METRICS.items() if m.consumer is not None)

    def __len__(self) -> int:
        return sum(1 for m in METRICS.values() if m.consumer is not None)


CONSUMERS: Mapping[str, ConsumerFactory] = _Consumers()
