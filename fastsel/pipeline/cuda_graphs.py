"""CUDA-graph capture of the scoring step (``--cuda-graphs auto|on|off``): the bucket policy and the runner.

One CUDA graph per static batch shape replays the whole step of :func:`fastsel.pipeline.streamed.run_pass` (every
consumer's ``capture`` hooks, the forward, ``consume`` with the Fisher backward, the logits' finite flag) as one launch,
instead of the thousands of small kernel launches a forward and backward of an encoder make::

    key = (B, bucket(T), autocast, the batch's keys and dtypes)    # T padded up to a multiple of 32
    sighting 1..warmup   eager, on a side stream, on the padded static buffers (cuBLAS, allocator warm up)
    sighting warmup + 1  capture (torch.cuda.graph), then replay once: this batch's device work
    later sightings      copy_ the batch into the static buffers, replay; the host-side bookkeeping of the
                         consumers (example counts) is redone by each consumer's GraphAdapter

A shape seen once (the last, smaller batch; a rare length) is only ever a warm-up, i.e. eager. What a graph cannot
replay runs eager for the whole pass with the reason in ``stats["cuda_graphs"]`` (scores.json ``pipeline``): a
consumer without an adapter, host syncs inside the step (``--fisher sampled`` draws its labels on the host),
confidence groups (their members change per batch), consumers that read ``output_hidden_states``, the exact
per-example fallback, a device other than CUDA, a capture that failed. Never silently wrong: a capture whose host
side effects are not what the adapter would redo is refused too.

``auto`` turns graphs on only where a GPU run measured that they pay (:data:`GRAPHS_PAY`, or a ``cuda_graphs``
entry of ``fastsel/ops/backend_table.json``); no GPU run has measured it yet, so ``auto`` is eager everywhere.
The capture itself (:class:`CudaGraphCapturer`) is injectable: the tests drive the policy on the CPU with a
capturer that runs the step instead of recording it.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn

from fastsel.data.features import PadCollator
from fastsel.ops.backend import BACKEND_TABLE_PATH
from fastsel.pipeline.registry import BatchConsumer, Step

__all__ = [
    "CUDA_GRAPH_MODES",
    "GRAPHS_PAY",
    "BUCKET_MULTIPLE",
    "check_cuda_graphs",
    "graphs_pay",
    "bucket_length",
    "pad_into",
    "BucketPolicy",
    "GraphAdapter",
    "FisherGraphAdapter",
    "GRAPH_ADAPTERS",
    "register_graph_adapter",
    "why_not_capturable",
    "CapturedGraph",
    "Capturer",
    "CudaGraphCapturer",
    "GraphSteps",
]

CUDA_GRAPH_MODES = ("auto", "on", "off")
# Padded lengths are multiples of this: at most max_length / 32 + 1 shapes per batch size, and at most 31 pad
# positions per example (tensor cores want multiples of 8 anyway).
BUCKET_MULTIPLE = 32
# Where a GPU run measured that graphs pay: {CUDA capability "major.minor": why}. Empty: no GPU run has measured it
# yet, so --cuda-graphs auto runs eager everywhere. The GPU check writes the verdict here (or as a "cuda_graphs"
# entry {"capabilities": {"9.0": why}} of fastsel/ops/backend_table.json, read first).
GRAPHS_PAY: dict[str, str] = {}

def check_cuda_graphs(mode: str, device: str | torch.device) -> None:
    """One-line ValueError for ``--cuda-graphs on`` without a CUDA device (before the model is loaded)."""
    if mode not in CUDA_GRAPH_MODES:
        raise ValueError(f"fastsel: --cuda-graphs must be one of {', '.join(CUDA_GRAPH_MODES)}, got {mode!r}")
    if mode == "on" and torch.device(device).type != "cuda":
        raise ValueError(f"fastsel: --cuda-graphs on needs a CUDA device (--device cuda), not {str(device)!r}; "
                         "use --cuda-graphs auto or off")


def graphs_pay(device: torch.device) -> tuple[bool, str]:
    """(whether ``--cuda-graphs auto`` captures on ``device``, why): a GPU run's measurement decides."""
    if device.type != "cuda":
        return False, f"auto: eager on {device.type} (CUDA graphs need a CUDA device)"
    major, minor = torch.cuda.get_device_capability(device)
    cap = f"{major}.{minor}"
    measured = dict(GRAPHS_PAY)
    try:
        measured.update(json.loads(BACKEND_TABLE_PATH.read_text()).get("cuda_graphs", {}).get("capabilities", {}))
    except (OSError, ValueError, AttributeError):
        pass
    if cap in measured:
        return True, f"auto: on (capability {cap}: {measured[cap]})"
    return False, (f"auto: eager (no GPU run has measured that CUDA graphs pay on capability {cap}: "
                   "fastsel.pipeline.cuda_graphs.GRAPHS_PAY; --cuda-graphs on forces them)")


# -- the bucket policy -------------------------------------------------------------------------------------------


def bucket_length(length: int, multiple: int = BUCKET_MULTIPLE, cap: int | None = None) -> int:
    """``length`` rounded up to a multiple of ``multiple``, but not beyond ``cap`` (the longest input the run
    tokenises, within the model's positions), and never below ``length``."""
    if length < 1 or multiple < 1:
        raise ValueError(f"fastsel: bucket_length needs length >= 1 and multiple >= 1, got {length}, {multiple}")
    padded = -(-length // multiple) * multiple
    return max(length, min(padded, cap)) if cap is not None else padded


def pad_into(out: Mapping[str, Tensor], batch: Mapping[str, Tensor], pad_values: Mapping[str, int]) -> None:
    """Copy ``batch`` into the buffers ``out`` in place: (B, T) tensors into (B, T') ones (T' >= T), the positions
    T.. filled with their pad value (input_ids: the pad token, attention_mask and token_type_ids: 0,
    special_tokens_mask: 1); (B,) tensors (labels, index) copied as they are.

    The extra positions go on the right whatever the tokenizer's padding side: the real tokens keep their absolute
    positions. With attention_mask 0 no real position attends to them, so every real hidden state, the logits
    and the loss are those of the unpadded batch; their output gradients are exactly 0, so they add nothing to the
    per-example squared gradients (the Fisher sums) or to masked statistics. What differs is float rounding
    (longer reductions in the attention), as with today's padding to the batch's longest example.
    """
    for k, dst in out.items():
        src = batch[k]
        if src.dim() == 2 and dst.shape[1] != src.shape[1]:
            if k not in pad_values:
                raise ValueError(f"fastsel: no pad value for the batch's {k!r} (B, T) tensor")
            T = src.shape[1]
            dst[:, :T].copy_(src, non_blocking=True)
            dst[:, T:].fill_(pad_values[k])
        else:
            dst.copy_(src, non_blocking=True)


@dataclass(frozen=True)
class BucketPolicy:
    """Which static shape a batch (B, T) runs as, and when a shape is captured.

    ``multiple``/``cap``: T is padded to :func:`bucket_length`; B is never padded (extra examples would count), so a
    smaller last batch is a shape of its own, seen once: eager. ``warmup``: eager sightings of a shape before its
    capture (PyTorch's recipe warms up on a side stream first). ``max_graphs``: graphs held at most (each holds its
    static buffers; they share one memory pool); later shapes run eager. ``max_shapes``: shapes whose buffers are
    kept (warm-up included); a batch of a shape beyond them runs eager, unpadded.
    """

    multiple: int = BUCKET_MULTIPLE
    cap: int | None = None
    warmup: int = 1
    max_graphs: int = 32
    max_shapes: int = 128

    def __post_init__(self) -> None:
        if self.multiple < 1 or self.warmup < 1 or self.max_graphs < 0 or self.max_shapes < 0:
            raise ValueError(f"fastsel: BucketPolicy needs multiple >= 1, warmup >= 1, max_graphs >= 0 and max_shapes "
                             f">= 0, got {self}")

    def key(self, batch: Mapping[str, Tensor], autocast: str) -> tuple:
        """The static shape of ``batch`` (input_ids (B, T)): (B, padded T, autocast, ((key, dtype, rank), ...))."""
        B, T = batch["input_ids"].shape
        layout = tuple(sorted((k, str(v.dtype), v.dim()) for k, v in batch.items()))
        return int(B), bucket_length(int(T), self.multiple, self.cap), autocast, layout


# -- what each consumer's step changes on the host ---------------------------------------------------------------


class GraphAdapter:
    """What the runner needs to know of a consumer to replay its step as a graph.

    A replay re-runs the device work only; the Python side of a step (example counters, say) must be redone by
    :meth:`advance`. ``host_state`` is compared before and after the capture: the capture refuses a step whose host
    changes are not ``advance``'s.
    """

    def why_not(self, consumer: BatchConsumer) -> str | None:
        """Why this consumer's step cannot be captured (host syncs, data-dependent work), or None."""
        return None

    def why_not_after(self, consumer: BatchConsumer) -> str | None:
        """After an eager step: a reason found only at run time (a fallback that ran), or None."""
        return None

    def host_state(self, consumer: BatchConsumer) -> Any:
        """The host-side state a step changes (comparable with ==)."""
        return None

    def restore(self, consumer: BatchConsumer, state: Any) -> None:
        """Set the host-side state back to ``state``."""

    def advance(self, state: Any, batch_size: int) -> Any:
        """``state`` after one more step of ``batch_size`` examples."""
        return state


class FisherGraphAdapter(GraphAdapter):
    """The Fisher consumer (:class:`fastsel.pipeline.drivers.fisher.FisherConsumer`: ``mode``, ``groups``, ``acc`` a
    :class:`fastsel.capture.per_example.SquaredGradAccumulator`). Its accumulators are persistent fp32 tensors
    updated in place (``add_``) by the hooks, so the graph's replays add into them; the host keeps
    ``num_examples`` and ``sums_used``."""

    def why_not(self, consumer: BatchConsumer) -> str | None:
        mode = getattr(consumer, "mode", None)
        if mode == "sampled":
            return "--fisher sampled draws its labels on the host (a sync in every step)"
        if getattr(consumer, "groups", 0):
            return ("--confidence-groups: the examples of each group change from batch to batch (found on the host); "
                    "--confidence-groups 0 allows graphs")
        acc = getattr(consumer, "acc", None)
        if acc is None:
            return "the Fisher consumer has no accumulator (acc)"
        labels = getattr(getattr(acc.model, "config", None), "num_labels", 2)
        if mode == "exact" and labels > 2:
            return f"--fisher exact with {labels} classes: its eigendecomposition (torch.linalg.eigh) syncs"
        return self.why_not_after(consumer)

    def why_not_after(self, consumer: BatchConsumer) -> str | None:
        fallback = getattr(consumer, "acc").fallback_params
        if fallback:
            return (f"the exact per-example fallback ran for {len(fallback)} parameter(s) (a host loop whose work "
                    "depends on the batch)")
        return None

    def host_state(self, consumer: BatchConsumer) -> Any:
        acc = getattr(consumer, "acc")
        return acc.num_examples, acc.sums_used, tuple(acc.group_counts), frozenset(acc.fallback_params)

    def restore(self, consumer: BatchConsumer, state: Any) -> None:
        acc = getattr(consumer, "acc")
        acc.num_examples, acc.sums_used, counts, fallback = state
        acc.group_counts, acc.fallback_params = list(counts), set(fallback)

    def advance(self, state: Any, batch_size: int) -> Any:
        n, _, counts, fallback = state
        return n + batch_size, True, counts, fallback  # without groups a batch goes to the plain sums


GRAPH_ADAPTERS: dict[str, GraphAdapter] = {"fisher": FisherGraphAdapter()}


def register_graph_adapter(name: str, adapter: GraphAdapter) -> None:
    """Let the consumer of metric ``name`` run in CUDA graphs (a consumer without an adapter runs eager)."""
    GRAPH_ADAPTERS[name] = adapter


def why_not_capturable(consumers: Sequence[BatchConsumer]) -> str | None:
    """Why the step of ``consumers`` cannot run as a graph (the first reason), or None."""
    for c in consumers:
        if c.needs_hidden_states:
            return (f"consumer {c.name!r} reads output_hidden_states after the forward (one tensor per layer of the "
                    "batch's shape, read on the host)")
        adapter = GRAPH_ADAPTERS.get(c.name)
        if adapter is None:
            return f"consumer {c.name!r} has no CUDA-graph adapter (fastsel.pipeline.cuda_graphs.register_graph_adapter)"
        why = adapter.why_not(c)
        if why:
            return why
    return None


# -- the capture ---------------------------------------------------------------------------------------------------


class CapturedGraph(Protocol):
    """A captured step: ``replay()`` runs its device work again; ``outputs`` are its (static) outputs."""

    outputs: Any

    def replay(self) -> None: ...


class Capturer(Protocol):
    """How steps are warmed up and captured. ``device_types``: where it works; ``capture_runs_work``: whether
    ``capture(fn)`` also ran fn's work (a CUDA capture only records it: the runner replays once after)."""

    device_types: tuple[str, ...]
    capture_runs_work: bool

    def warmup(self, fn: Callable[[], Any]) -> Any: ...

    def capture(self, fn: Callable[[], Any]) -> CapturedGraph: ...


class _TorchGraph:
    def __init__(self, graph: Any, outputs: Any) -> None:
        self.graph, self.outputs = graph, outputs

    def replay(self) -> None:
        self.graph.replay()


class CudaGraphCapturer:
    """torch.cuda.CUDAGraph capture as PyTorch's docs describe: warm-up on a side stream, then
    ``torch.cuda.graph``; every graph of the pass shares one memory pool (they replay one after another on one
    stream, so the intermediates of one can reuse the memory of another's)."""

    device_types = ("cuda",)
    capture_runs_work = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool: Any = None

    def warmup(self, fn: Callable[[], Any]) -> Any:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)  # the batch was copied to the device on the current stream
        with torch.cuda.stream(side):
            out = fn()
        current.wait_stream(side)
        return out

    def capture(self, fn: Callable[[], Any]) -> CapturedGraph:
        graph = torch.cuda.CUDAGraph()
        # thread_local: the prefetch thread keeps pinning host memory while we capture, which the default "global"
        # mode would refuse; nothing of that thread goes onto the capturing stream.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        if self.pool is None:
            self.pool = graph.pool()
        return _TorchGraph(graph, out)


# -- the runner ----------------------------------------------------------------------------------------------------


@dataclass
class _Shape:
    static: dict[str, Tensor]  # the static input buffers of this shape: the graph reads them
    seen: int = 0
    graph: CapturedGraph | None = None


@dataclass
class GraphSteps:
    """The step ``run_pass`` calls: ``step(model, consumers, batch, autocast, device) -> logits_ok``.

    Eager (``used`` False): ``step`` is the eager step itself, nothing wrapped. Else :meth:`run`: warm-up, capture
    and replay per :class:`BucketPolicy` shape. ``report(batches)`` gives ``stats["cuda_graphs"]``.
    """

    requested: str
    eager_step: Step
    used: bool
    why: str
    policy: BucketPolicy = field(default_factory=BucketPolicy)
    capturer: Capturer | None = None
    pad_values: Mapping[str, int] = field(default_factory=dict)
    consumers: Sequence[BatchConsumer] = ()
    shapes: dict[tuple, _Shape] = field(default_factory=dict)
    captured: int = 0
    replays: int = 0
    eager: dict[str, int] = field(default_factory=dict)

    @property
    def step(self) -> Step:
        return self.run if self.used else self.eager_step

    @classmethod
    def for_pass(cls, ctx: Any, consumers: Sequence[BatchConsumer], eager_step: Step, *,
                 capturer: Capturer | None = None, policy: BucketPolicy | None = None) -> "GraphSteps":
        """Resolve ``ctx.pipeline.cuda_graphs`` for a pass of ``consumers`` on ``ctx.device`` (a PipelineContext)."""
        requested = ctx.pipeline.cuda_graphs
        device = ctx.device
        capturer = capturer or default_capturer(device)
        if requested == "off":
            return cls(requested, eager_step, False, "off")
        if requested == "on" and device.type not in capturer.device_types:
            check_cuda_graphs(requested, device)  # raises for a non-CUDA device
            raise ValueError(f"fastsel: --cuda-graphs on: this capturer works on {capturer.device_types}, not {device}")
        if requested == "auto":
            pays, why = graphs_pay(device)
            if not pays:
                return cls(requested, eager_step, False, why)
        else:
            why = "on"
        blocked = why_not_capturable(consumers)
        if blocked:
            if requested == "on":
                print(f"fastsel: --cuda-graphs on: the step runs eager: {blocked}", file=sys.stderr)
            return cls(requested, eager_step, False, f"eager: {blocked}")
        policy = policy or BucketPolicy(cap=getattr(ctx.config, "max_length", None))
        return cls(requested, eager_step, True, why, policy, capturer, dict(PadCollator(ctx.tokenizer).pad_values),
                   list(consumers))

    # -- host state of the consumers -----------------------------------------------------------------------------

    def _states(self) -> list[Any]:
        return [GRAPH_ADAPTERS[c.name].host_state(c) for c in self.consumers]

    def _restore(self, states: list[Any]) -> None:
        for c, s in zip(self.consumers, states):
            GRAPH_ADAPTERS[c.name].restore(c, s)

    def _advanced(self, states: list[Any], batch_size: int) -> list[Any]:
        return [GRAPH_ADAPTERS[c.name].advance(s, batch_size) for c, s in zip(self.consumers, states)]

    def _count(self, why: str) -> None:
        self.eager[why] = self.eager.get(why, 0) + 1

    def _give_up(self, why: str) -> None:
        """Eager for the rest of the pass (the graphs are dropped: their memory is freed)."""
        done = self.captured + self.replays + sum(self.eager.values())
        self.used, self.why = False, f"eager from batch {done + 1} of this run: {why}"
        self.shapes.clear()
        if self.requested == "on":
            print(f"fastsel: --cuda-graphs on: the step runs eager from now on: {why}", file=sys.stderr)

    # -- one batch ------------------------------------------------------------------------------------------------

    def run(self, model: nn.Module, consumers: list[BatchConsumer], batch: Mapping[str, Tensor], autocast: str,
            device: torch.device) -> Tensor:
        """One batch (the shapes of :class:`BatchConsumer`) -> the logits are finite, 0-dim bool."""
        if not self.used:  # given up during the pass
            self._count("given up")
            return self.eager_step(model, consumers, batch, autocast, device)
        assert self.capturer is not None
        key = self.policy.key(batch, autocast)
        shape = self.shapes.get(key)
        if shape is None:
            if len(self.shapes) >= self.policy.max_shapes:
                self._count("shape limit")  # the static buffers stay bounded on a corpus of very many shapes
                return self.eager_step(model, consumers, batch, autocast, device)
            B, T = key[0], key[1]
            shape = _Shape({k: torch.empty((B, T) if v.dim() == 2 else tuple(v.shape), dtype=v.dtype, device=v.device)
                            for k, v in batch.items()})
            self.shapes[key] = shape
        shape.seen += 1
        pad_into(shape.static, batch, self.pad_values)
        B = key[0]

        def fn() -> Tensor:
            return self.eager_step(model, consumers, shape.static, autocast, device)

        if shape.graph is not None:
            before = self._states()
            shape.graph.replay()
            self._restore(self._advanced(before, B))  # the graph redid the device work; the host side is redone here
            self.replays += 1
            return shape.graph.outputs
        graphs = sum(1 for s in self.shapes.values() if s.graph is not None)
        if shape.seen <= self.policy.warmup or graphs >= self.policy.max_graphs:
            out = self.capturer.warmup(fn)
            self._count("warm-up (first sightings of a shape)" if shape.seen <= self.policy.warmup else "graph limit")
            why = next((w for c in self.consumers if (w := GRAPH_ADAPTERS[c.name].why_not_after(c))), None)
            if why:
                self._give_up(why)
            return out
        before = self._states()
        try:
            graph = self.capturer.capture(fn)
        except Exception as exc:  # noqa: BLE001 - any failure: this batch and the rest run eager, the reason kept
            if self.capturer.capture_runs_work:
                raise
            self._restore(before)  # a CUDA capture ran no device work: the batch is still to do
            self._give_up(f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
            self._count("capture failed")
            return self.eager_step(model, consumers, batch, autocast, device)
        after = self._states()
        if after != self._advanced(before, B):
            if not self.capturer.capture_runs_work:
                self._restore(before)
                out = self.eager_step(model, consumers, batch, autocast, device)
            else:
                out = graph.outputs
            self._give_up("the captured step changed host state that its replays would not redo")
            self._count("capture refused")
            return out
        if not self.capturer.capture_runs_work:  # a capture only records: this batch's work is the first replay
            graph.replay()
            self._restore(after)  # the host side was done by the capture (a CUDA replay changes none)
        shape.graph = graph
        self.captured += 1
        return graph.outputs

    def report(self, batches: int | None = None) -> dict[str, Any]:
        """``stats["cuda_graphs"]``: requested, used, why, graphs captured, replays, eager batches and why.

        ``batches``: the batches this run stepped (counts the eager ones when the runner was never used)."""
        eager = dict(self.eager)
        stepped = self.captured + self.replays + sum(eager.values())
        if batches is not None and batches > stepped:
            eager[self.why] = eager.get(self.why, 0) + batches - stepped
        out: dict[str, Any] = {"requested": self.requested, "used": self.captured > 0, "why": self.why,
                               "graphs_captured": self.captured, "replays": self.replays,
                               "eager_batches": sum(eager.values()), "eager_why": eager}
        if self.capturer is not None:
            out["bucket_multiple"], out["warmup"] = self.policy.multiple, self.policy.warmup
        return out


def default_capturer(device: torch.device) -> Capturer:
    """The capturer of a pass on ``device`` (tests replace it)."""
    return CudaGraphCapturer(device)
