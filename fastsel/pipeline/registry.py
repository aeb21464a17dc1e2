"""The one registry of layer-scoring metrics.

A metric is one :class:`Metric` record: its in-memory ``run(ctx)``, its streamed ``consumer`` (a factory of
:class:`BatchConsumer`, fed by :func:`fastsel.pipeline.streamed.run_pass`) and its options, whose fields are its
CLI flags. :func:`register_metric` is the one way in; the metric drivers in :mod:`fastsel.pipeline.drivers` call it
on import, and this module imports none of them.
It sits below :mod:`fastsel.pipeline.config` and :mod:`fastsel.pipeline.context` (they import it, it imports
neither, not even for type hints). A metric's options are a dataclass of :func:`fastsel.utils.settings.setting`
fields, from which the CLI makes the metric's flags.
"""
from __future__ import annotations

import abc
import argparse
import contextlib
import inspect
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Mapping

import torch
from torch import Tensor, nn

from fastsel.scores.layer_scores import LayerScores

__all__ = ["Metric", "METRICS", "register_metric", "BatchConsumer", "ConsumerFactory", "default_num_examples", "AUTOCAST",
           "autocast_context", "options_of", "Step"]

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, name: str) -> ContextManager[Any]:
    """The autocast of ``--autocast name`` (a key of :data:`AUTOCAST`) on ``device``; ``none``: a null context."""
    dtype = AUTOCAST[name]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


class BatchConsumer(abc.ABC):
    """One metric's accumulator inside the shared streamed pass: every hook the pass calls, declared here.

    The pass (:func:`fastsel.pipeline.streamed.run_pass`) enters ``pass_hooks()`` once around it all and calls, per
    batch: ``capture(batch)`` (entered around the
    forward and the consume calls), the one forward, then ``consume(batch, outputs)`` (consumers with
    ``needs_backward`` last); ``finite_flag()`` every ``--finite-check-every`` batches and before each checkpoint,
    stability check and the end; ``state_dict()`` at each checkpoint and ``load_state_dict`` on resume; when a
    check fails, ``zero_()`` before the batches since the last check are replayed one by one to find the one that
    went non-finite, then ``first_nonfinite()``; ``stability_scores(active)`` at each check of ``--until-stable``;
    after the pass ``all_reduce(group)`` (under torchrun) and ``result()``.

    A subclass sets ``name`` (the name its :class:`Metric` is registered under) and implements the abstract hooks
    (``consume``, ``state_dict``, ``load_state_dict``, ``all_reduce``, ``result``): a class missing one cannot be
    instantiated (TypeError) nor registered (:func:`register_metric`). The other hooks have defaults, documented
    on each.

    Shapes: ``batch`` is a dict of input_ids (B, T) int64, attention_mask (B, T), token_type_ids (B, T) (when the
    model takes them), special_tokens_mask (B, T), labels (B,) on the pass's device; index (B,) int64 global example
    positions and, with ``--confidence-groups``, group (B,) int64 each example's confidence group, on the host;
    ``outputs`` is the model output of that batch (logits (B, C), and ``hidden_states``, a tuple of L+1 tensors
    (B, T, D), when any consumer sets ``needs_hidden_states``).
    """

    name: ClassVar[str] = ""
    #: True: the forward keeps its graph and ``consume`` runs with grad enabled (Fisher); False: no graph.
    needs_backward: ClassVar[bool] = False
    #: True: the forward is run with ``output_hidden_states=True`` (hooks on the blocks need not set it).
    needs_hidden_states: ClassVar[bool] = False
    #: True: ``stability_scores`` is implemented (``--until-stable`` refuses the consumers without it, up front).
    supports_stability: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        overrides = cls.stability_scores is not BatchConsumer.stability_scores
        if overrides != bool(cls.supports_stability):
            raise TypeError(f"fastsel: consumer {cls.__name__}: supports_stability is {cls.supports_stability} but "
                            f"stability_scores is {'' if overrides else 'not '}implemented; set both or neither")

    def pass_hooks(self) -> ContextManager[Any]:
        """Entered once around the whole pass (every batch, replay and stability check inside it): hooks that stay
        registered from batch to batch (registering them per batch costs host time at every step), which act only
        inside :meth:`capture`.

        Default: ``contextlib.nullcontext()``.
        """
        return contextlib.nullcontext()

    def capture(self, batch: Mapping[str, Tensor]) -> ContextManager[Any]:
        """Entered around the forward (and the consume calls) of each batch: forward hooks on the model, say.

        Default: ``contextlib.nullcontext()`` (nothing to hook).
        """
        return contextlib.nullcontext()

    @abc.abstractmethod
    def consume(self, batch: Mapping[str, Tensor], outputs: Any) -> None:
        """Add one batch (shapes: the class docstring) to the statistics; grad is enabled iff ``needs_backward``."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything resuming needs (tensors on the CPU or the device; the checkpoint moves nothing)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (the same settings: the checkpoint's fingerprint says so)."""

    @abc.abstractmethod
    def all_reduce(self, group: Any = None) -> None:
        """Combine this rank's statistics with every other rank's (called once, after the pass, under torchrun)."""

    @abc.abstractmethod
    def result(self) -> LayerScores:
        """The metric's scores of the blocks from the (reduced) statistics. Called once, at the end of the pass: it
        may spend the accumulators (Fisher turns its sums into the diagonal in place, with no copy)."""

    def finite_flag(self) -> Tensor | None:
        """0-dim bool tensor on the pass's device: every accumulator is finite; computed without a host sync (the
        pass reads the flags of all consumers, with the logits' of the batches since the last check, in one sync).

        Default: None (nothing to check).
        """
        return None

    def zero_(self) -> None:
        """Reset every accumulator to zero in place (the run is failing: a check found NaN/Inf, and the batches since
        the last check are replayed into the zeroed accumulators to find the one that went non-finite).

        Default: NotImplementedError (the error then names the range of batches, not the batch).
        """
        raise NotImplementedError(f"fastsel: metric {self.name!r} cannot reset its accumulators")

    def first_nonfinite(self) -> str | None:
        """Once a batch went non-finite: the first accumulator holding NaN/Inf, named for a message (the error's
        "first affected"), or None.

        Default: None (nothing to name).
        """
        return None

    def stability_scores(self, active: bool) -> Callable[[list[int]], list[float]]:
        """Mid-pass (``--until-stable``): ``scores_of(groups)``, the L block scores (a list of L floats) of the
        examples of the confidence groups ``groups`` seen so far, reduced over the ranks when ``active`` (a
        collective: every rank calls it at the same point); this rank's accumulators stay untouched.

        Default: not supported (``supports_stability`` is False): ``--until-stable`` says so before the pass;
        called anyway, NotImplementedError.
        """
        raise NotImplementedError(f"fastsel: --until-stable: metric {self.name!r} has no ranking confidence")


# one batch of the streamed pass through every consumer: step(model, consumers, batch, autocast, device) -> the
# logits are finite (0-dim bool, not synchronised); fastsel.pipeline.streamed._step, replayed by cuda_graphs and
# rerun by diagnosis
Step = Callable[[nn.Module, list, Mapping[str, Tensor], str, torch.device], Tensor]

# called with the run's fastsel.pipeline.context.PipelineContext (Any here: context.py imports this module)
ConsumerFactory = Callable[[Any], BatchConsumer]


def default_num_examples(metric: str) -> int | None:
    """The examples a comma-separated list of metrics is scored on by default: the largest of their
    ``default_examples`` (None when any of them wants all the data)."""
    wanted = [METRICS[name].default_examples for name in metric.split(",") if name in METRICS]
    return None if not wanted or any(w is None for w in wanted) else max(wanted)  # type: ignore[type-var]


def options_of(options: type, values: Mapping[str, Any]) -> Any:
    """The options dataclass of a metric from ``ScoreConfig.options`` (missing keys: the field defaults; unknown keys
    belong to other metrics and are ignored); validated by the dataclass."""
    known = {f.name for f in fields(options)}
    return options(**{k: v for k, v in values.items() if k in known and v is not None})


@dataclass(frozen=True)
class Metric:
    """A layer-scoring metric: ``run(ctx) -> LayerScores`` in memory, ``consumer(ctx)`` in the streamed pass, and
    ``options``, a dataclass of its settings (fields made with :func:`fastsel.utils.settings.setting`) whose fields
    are its CLI flags; their
    values land in ``ScoreConfig.options``. ``add_arguments`` adds hand-written flags instead (plug-ins)."""

    name: str
    run: Callable[[Any], LayerScores]  # called with a fastsel.pipeline.context.ScoringContext
    higher_is_better: bool = True
    classification_only: bool = False
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    plot: Callable[[LayerScores, str | Path], None] | None = None  # None: fastsel.scores.plot.plot_layer_scores
    options: type | None = None  # a dataclass of the metric's settings
    # the streamed pass's accumulator: a BatchConsumer subclass (or a function returning one); None: in-memory only
    consumer: ConsumerFactory | None = None
    # examples `fastsel score` draws when --num-examples is not given (docs/sample_size.md); None: all of them
    default_examples: int | None = None


METRICS: dict[str, Metric] = {}


def _check_consumer(metric: Metric) -> None:
    """TypeError (one line) for a consumer class that the streamed pass could not drive: not a
    :class:`BatchConsumer`, a required hook missing, or a ``name`` other than the metric's."""
    factory = metric.consumer
    if factory is None or not inspect.isclass(factory):
        if factory is not None and not callable(factory):
            raise TypeError(f"fastsel: the consumer of metric {metric.name!r} is not callable: {factory!r}")
        return  # a factory function: its consumer is checked when the pass makes it
    if not issubclass(factory, BatchConsumer):
        raise TypeError(f"fastsel: the consumer of metric {metric.name!r}, {factory.__name__}, is not a subclass of "
                        "fastsel.pipeline.registry.BatchConsumer")
    if inspect.isabstract(factory):
        missing = ", ".join(sorted(factory.__abstractmethods__))
        raise TypeError(f"fastsel: the consumer of metric {metric.name!r}, {factory.__name__}, does not implement "
                        f"the required hook(s) {missing} of BatchConsumer")
    if factory.name != metric.name:
        raise TypeError(f"fastsel: the consumer of metric {metric.name!r}, {factory.__name__}, is named "
                        f"{factory.name!r}: set its class attribute name = {metric.name!r}")


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to :data:`METRICS` (the one way in); its consumer class, if any, is checked first."""
    if metric.name in METRICS:
        raise ValueError(f"fastsel: metric {metric.name!r} registered twice")
    _check_consumer(metric)
    METRICS[metric.name] = metric
    return metric
