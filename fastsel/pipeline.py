"""The scoring pass over large corpora: streamed batches, several metrics from one forward, several
processes, checkpoints and resume.

One pass feeds every *consumer* (one per metric) from the same forward::

    for batch in BatchReader(corpus, plan[rank::K], start=cursor):     # memory-mapped, bucketed, prefetched
        with every consumer's capture(batch):                         # Fisher: per-example gradient hooks
            outputs = model(**inputs, output_hidden_states=any needs) # under optional bf16/fp16 autocast
            for c in consumers: c.consume(batch, outputs)             # no-backward consumers first
        every M examples: checkpoint {consumer states, cursor}        # atomic, one file per rank
    for c in consumers: c.all_reduce(group)                           # sums / exact merges over ranks
    rank 0: c.result() -> LayerScores -> scores.json (atomic)

A metric joins the pass by registering a consumer factory with :func:`register_consumer`; the Fisher
consumer (around :class:`fastsel.per_example.SquaredGradAccumulator`) is registered here. Consumers that
keep per-class statistics merge them exactly with :func:`merge_class_stats` (Chan et al.).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fastsel.checkpoint import load_checkpoint, rank_file, save_checkpoint
from fastsel.distributed import DistEnv, all_gather_objects, all_reduce_sum_, barrier, init_distributed, shutdown_distributed
from fastsel.layers import LayerMap
from fastsel.progress import progress_bar
from fastsel.scores import LayerScores
from fastsel.stream import BatchReader, TokenizedCorpus, load_tokenized_corpus, padding_stats, plan_batches, shard_batches

__all__ = [
    "PipelineConfig",
    "BatchConsumer",
    "PipelineContext",
    "CONSUMERS",
    "register_consumer",
    "supports",
    "merge_class_stats",
    "FisherConsumer",
    "run_pass",
    "run_pipeline",
    "output_path",
]

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class PipelineConfig:
    """How the pass runs (not what it computes, except autocast and batching, which change float sums)."""

    max_tokens: int | None = None  # padded tokens per batch; None: --batch-size examples per batch
    bucket: bool = True  # length-bucketed batches (minimal padding)
    autocast: str = "none"  # none | bf16 | fp16 forward; accumulators stay fp32
    checkpoint: str | None = None  # folder of per-rank checkpoint files
    checkpoint_every: int = 10000  # examples (over all ranks) between checkpoints
    resume: bool = False
    prefetch: int = 2  # batches read ahead by a background thread (0: inline)
    cache_dir: str | None = None  # tokenised Arrow caches (default $FASTSEL_CACHE or ~/.cache/fastsel)
    dist_timeout: float | None = None  # seconds a collective waits for the other ranks (None: distributed default)
    # --until-stable: stop once the ranking is stable (fastsel.confidence): Kendall tau between the halves of
    # the groups >= stable_tau and the top-3 set unchanged over the last stable_checks checks, one check every
    # check_every examples (over all ranks)
    until_stable: bool = False
    stable_tau: float = 0.9
    check_every: int = 200
    stable_checks: int = 3

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"fastsel: max_tokens must be >= 1, got {self.max_tokens}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"fastsel: autocast must be one of {sorted(AUTOCAST)}, got {self.autocast!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"fastsel: checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.prefetch < 0:
            raise ValueError(f"fastsel: prefetch must be >= 0, got {self.prefetch}")
        if self.dist_timeout is not None and not self.dist_timeout > 0:
            raise ValueError(f"fastsel: dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if not (isinstance(self.stable_tau, (int, float)) and 0 < self.stable_tau <= 1):
            raise ValueError(f"fastsel: --stable-tau must be in (0, 1], got {self.stable_tau}")
        if self.check_every < 1:
            raise ValueError(f"fastsel: --check-every must be >= 1 example, got {self.check_every}")
        if self.stable_checks < 1:
            raise ValueError(f"fastsel: --stable-checks must be >= 1, got {self.stable_checks}")
        if self.resume and not self.checkpoint:
            raise ValueError("fastsel: --resume needs --checkpoint PATH (the folder the interrupted run wrote)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "PipelineConfig":
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"fastsel: unknown PipelineConfig keys {sorted(unknown)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# Consumers
# --------------------------------------------------------------------------------------------------


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


@dataclass
class PipelineContext:
    """What a consumer factory gets."""

    config: Any  # ScoreConfig
    pipeline: PipelineConfig
    model: nn.Module
    tokenizer: Any
    layer_map: LayerMap
    task: Any  # TaskSpec
    device: torch.device
    num_examples: int


ConsumerFactory = Callable[[PipelineContext], BatchConsumer]
CONSUMERS: dict[str, ConsumerFactory] = {}


def register_consumer(name: str, factory: ConsumerFactory) -> ConsumerFactory:
    """Make metric ``name`` (already in fastsel.scoring.METRICS) computable by the streamed pass."""
    if name in CONSUMERS:
        raise ValueError(f"fastsel: consumer for {name!r} registered twice")
    CONSUMERS[name] = factory
    return factory


def supports(metric: str) -> bool:
    """Whether every metric of a comma-separated list has a streaming consumer."""
    return all(name in CONSUMERS for name in metric.split(","))


def confidence_groups(cfg: Any) -> int:
    """K of the ranking confidence (``options["confidence_groups"]``, default 4; 0: none)."""
    from fastsel.confidence import DEFAULT_GROUPS

    return int(cfg.options.get("confidence_groups", DEFAULT_GROUPS))


def merge_class_stats(
    count_a: Tensor, mean_a: Tensor, m2_a: Tensor, count_b: Tensor, mean_b: Tensor, m2_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact merge of two sets of per-class statistics (Chan, Golub & LeVeque 1979).

    count (C,) examples per class, mean (C, D), m2 (C, D, D) = sum_i (x_i - mean)(x_i - mean)^T per class.
    Returns the statistics of the union: n = na + nb, delta = mb - ma,
    mean = ma + delta nb / n, M2 = M2a + M2b + delta delta^T na nb / n. Classes empty on both sides stay
    zero. Computed in the inputs' dtype (use float64 accumulators for long corpora).
    """
    if count_a.shape != count_b.shape or mean_a.shape != mean_b.shape or m2_a.shape != m2_b.shape:
        raise ValueError(f"fastsel: class statistics of different shapes: {tuple(mean_a.shape)} vs {tuple(mean_b.shape)}")
    if mean_a.dim() != 2 or m2_a.shape != (*mean_a.shape, mean_a.shape[1]) or count_a.shape != mean_a.shape[:1]:
        raise ValueError(f"fastsel: expected count (C,), mean (C, D), m2 (C, D, D); got {tuple(count_a.shape)}, "
                         f"{tuple(mean_a.shape)}, {tuple(m2_a.shape)}")
    na = count_a.to(mean_a.dtype)
    nb = count_b.to(mean_a.dtype)
    n = na + nb
    safe = torch.where(n > 0, n, torch.ones_like(n))
    delta = mean_b - mean_a
    mean = mean_a + delta * (nb / safe)[:, None]
    m2 = m2_a + m2_b + delta[:, :, None] * delta[:, None, :] * (na * nb / safe)[:, None, None]
    return count_a + count_b, mean, m2


class FisherConsumer:
    """Fisher diagonal of the shared pass: per-example squared gradients of the log-likelihood.

    Wraps :class:`SquaredGradAccumulator`: ``capture`` hooks the model for the batch, ``consume`` turns
    the logits into the likelihood terms (labels sampled per *global* example index) and runs the
    backward. Sums are fp32 (whatever the autocast dtype); the rank reduction sums them in fp64.
    """

    name = "fisher"
    needs_backward = True
    needs_hidden_states = False

    def __init__(self, ctx: PipelineContext) -> None:
        from fastsel.fisher import FISHER_MODES
        from fastsel.per_example import SquaredGradAccumulator

        self.ctx = ctx
        self.mode = ctx.config.options.get("fisher", "empirical")
        if self.mode not in FISHER_MODES:
            raise ValueError(f"fastsel: unknown Fisher mode {self.mode!r}; choose from {FISHER_MODES}")
        self.seed = ctx.config.seed
        self.acc = SquaredGradAccumulator(ctx.model)
        self.groups = confidence_groups(ctx.config)
        if self.groups:
            self.acc.enable_groups(self.groups)

    def capture(self, batch: Mapping[str, Tensor]) -> ContextManager[Any]:
        from fastsel.confidence import group_ids

        groups = group_ids(batch["index"], self.groups) if self.groups else None
        return self.acc.capture(batch_size=int(batch["input_ids"].shape[0]), groups=groups)

    def consume(self, batch: Mapping[str, Tensor], outputs: Any) -> None:
        from fastsel.fisher import fisher_terms_from_logits

        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        terms = fisher_terms_from_logits(self.ctx.model, logits, batch.get("labels"), self.mode, self.seed, batch["index"])
        self.acc.backward(terms)

    def state_dict(self) -> dict:
        cpu = lambda d: {n: t.detach().cpu().clone() for n, t in d.items()}  # noqa: E731
        return {k: (cpu(v) if k == "sums" else [cpu(g) for g in v] if k == "group_sums" else v)
                for k, v in self.acc.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.acc.load_state_dict(state)

    def _sums(self) -> dict[str, Tensor]:
        sums = getattr(self.acc, "sums", None)
        return sums if isinstance(sums, dict) else self.acc.state_dict().get("sums", {})

    def finite_flag(self) -> Tensor | None:
        """0-dim bool tensor: every accumulator is finite (no host sync here).

        The sums are non-negative, so the sum of each is finite exactly when all its elements are (short of a
        total above the float range, itself a broken Fisher): one read of the accumulators, no temporaries;
        far cheaper than ``isfinite(t).all()`` on a CPU.
        """
        totals = [t.sum() for t in self._sums().values() if t.is_floating_point()]
        return torch.isfinite(torch.stack(totals)).all() if totals else None

    def first_nonfinite(self) -> str | None:
        """The first accumulator (in the model's parameter order) holding NaN/Inf, named, or None."""
        sums = self._sums()
        order = [n for n, _ in self.ctx.model.named_parameters() if n in sums] + sorted(set(sums) - set(dict(self.ctx.model.named_parameters())))
        for n in order:
            t = sums[n]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"Fisher accumulator of parameter {n} ({_group(self.ctx.layer_map, n)})"
        return None

    def all_reduce(self, group: Any = None) -> None:
        names = sorted(self.acc.sums)
        all_reduce_sum_([self.acc.sums[n] for n in names], group)
        count = torch.tensor([float(self.acc.num_examples)], dtype=torch.float64, device=self.acc.sums[names[0]].device)
        all_reduce_sum_([count], group)
        self.acc.num_examples = int(count.item())
        if self.groups:
            all_reduce_sum_([g[n] for g in self.acc.group_sums for n in names], group)
            counts = torch.tensor(self.acc.group_counts, dtype=torch.float64, device=count.device)
            all_reduce_sum_([counts], group)
            self.acc.group_counts = [int(c) for c in counts.tolist()]
        fallback = all_gather_objects(sorted(self.acc.fallback_params), group)
        self.acc.fallback_params = set().union(*map(set, fallback))

    def result(self) -> LayerScores:
        from fastsel.fisher import FisherResult, fisher_scores

        res = FisherResult(self.acc.mean(), self.acc.num_examples, self.mode, tuple(sorted(self.acc.fallback_params)))
        cfg = self.ctx.config
        scores = fisher_scores(res, self.ctx.model, self.ctx.layer_map, model_name=cfg.model, task=self.ctx.task.name, split=cfg.split)
        if self.groups:
            scores.info["ranking_confidence"] = self.confidence(scores)
        return scores

    def group_scores(self, groups: list[int], group_sums: list[dict[str, Tensor]] | None = None,
                     group_counts: list[int] | None = None) -> list[float]:
        """Layer scores of the examples of ``groups`` alone (their sums in float64 over their count)."""
        from fastsel.fisher import layer_statistics

        group_sums = self.acc.group_sums if group_sums is None else group_sums
        group_counts = self.acc.group_counts if group_counts is None else group_counts
        n = sum(group_counts[g] for g in groups)
        if n == 0:
            raise ValueError(f"no examples in groups {groups}")
        diag = {name: sum(group_sums[g][name].double() for g in groups) / n for name in self.acc.sums}
        layers, _ = layer_statistics(diag, self.ctx.model, self.ctx.layer_map)
        return [l["score"] for l in layers]

    def stability_scores(self, active: bool) -> Callable[[list[int]], list[float]]:
        """Mid-pass: scores_of(groups) on the groups so far, reduced over the ranks (copies; this rank's
        accumulators are untouched)."""
        names = sorted(self.acc.sums)
        sums = [{n: g[n].detach().clone() for n in names} for g in self.acc.group_sums]
        counts = list(self.acc.group_counts)
        if active:
            all_reduce_sum_([g[n] for g in sums for n in names])
            c = torch.tensor(counts, dtype=torch.float64, device=sums[0][names[0]].device)
            all_reduce_sum_([c])
            counts = [int(v) for v in c.tolist()]
        return lambda groups: self.group_scores(groups, sums, counts)

    def confidence(self, scores: LayerScores) -> dict:
        from fastsel.confidence import confidence_from_groups

        return confidence_from_groups([l.score for l in scores.layers], self.group_scores, self.groups, True)


register_consumer("fisher", FisherConsumer)


# --------------------------------------------------------------------------------------------------
# Non-finite values: one host sync per batch; the diagnosis (which batch, which layer) only on failure
# --------------------------------------------------------------------------------------------------


def _group(layer_map: LayerMap, name: str) -> str:
    try:
        group = layer_map.group_of(name)
    except Exception:  # noqa: BLE001 - naming only
        return "?"
    return f"block {group.split('.', 1)[1]}" if group.startswith("layer.") else group


def _logits(outputs: Any) -> Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


def _first_nonfinite_parameter(model: nn.Module, layer_map: LayerMap) -> str | None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            kind = "NaN" if bool(torch.isnan(p).any()) else "Inf"
            return f"parameter {name} ({_group(layer_map, name)}) holds {kind} in the model's weights"
    return None


def _first_nonfinite_output(ctx: "PipelineContext", batch: Mapping[str, Tensor], autocast: str) -> str | None:
    """Re-run the batch's forward with hooks on the embeddings and every block: the first non-finite output."""
    lm = ctx.layer_map
    named = dict(ctx.model.named_modules())
    modules = [("embeddings", lm.embeddings_name)] + [(f"block {l}", lm.block_name(l)) for l in range(lm.num_layers)]
    found: list[str] = []
    handles = []

    def hook(where: str):
        def fn(_m, _i, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if not found and isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                found.append(f"the output of {where}")
        return fn

    try:
        for where, name in modules:
            if name in named:
                handles.append(named[name].register_forward_hook(hook(where)))
        with torch.no_grad(), _autocast(ctx.device, autocast):
            out = ctx.model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
        if not found and not bool(torch.isfinite(_logits(out)).all()):
            found.append("the output of the head (logits)")
    except Exception:  # noqa: BLE001 - diagnosis only
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _nonfinite_error(ctx: "PipelineContext", consumers: list, batch: Mapping[str, Tensor], batch_no: int, rank: int,
                     world: int, autocast: str, logits_ok: bool, saved: int | None) -> ValueError:
    """A fastsel.scoring.NonFiniteError (one line) naming the batch, the first layer/parameter affected, a remedy."""
    from fastsel.scoring import NonFiniteError

    what = "the accumulators" if logits_ok else "the logits/loss"
    where = _first_nonfinite_parameter(ctx.model, ctx.layer_map)
    if where is None and not logits_ok:
        where = _first_nonfinite_output(ctx, batch, autocast)
    if where is None:
        for c in consumers:
            probe = getattr(c, "first_nonfinite", None)
            where = probe() if probe is not None else None
            if where:
                break
    idx = batch["index"].tolist() if "index" in batch else []
    shown = ",".join(map(str, idx[:4])) + (",..." if len(idx) > 4 else "")
    rank_txt = f" of rank {rank}/{world}" if world > 1 else ""
    if where and "weights" in where:
        hint = "the model's weights are broken: reload or re-download the checkpoint (fp32 cannot fix them)"
    elif autocast == "fp16":
        hint = "try --autocast bf16 (fp16 overflows easily), or fp32 (--autocast none)"
    elif autocast == "bf16":
        hint = "try fp32 (--autocast none)"
    else:
        hint = "try fp32 (--autocast none) and check the model's weights and the inputs"
    kept = f"; the checkpoint of batch {saved} is kept" if saved is not None else ""
    return NonFiniteError(f"fastsel: non-finite values (NaN/Inf) in {what} at batch {batch_no}{rank_txt} (examples {shown}); "
                          f"first affected: {where or 'unknown'}; no scores written{kept}; {hint}")


# --------------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------------


def _autocast(device: torch.device, name: str) -> ContextManager[Any]:
    dtype = AUTOCAST[name]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def _step(model: nn.Module, consumers: list[BatchConsumer], batch: dict[str, Tensor], autocast: str,
          device: torch.device) -> tuple[Tensor, Tensor]:
    """One batch through the model, shared by all consumers (see the module docstring).

    Returns two 0-dim bool tensors (not synchronised): the logits are finite, the accumulators are finite.
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    grad = any(c.needs_backward for c in consumers)
    hidden = any(c.needs_hidden_states for c in consumers)
    kwargs = {"output_hidden_states": True} if hidden else {}
    with contextlib.ExitStack() as stack:
        for c in consumers:
            stack.enter_context(c.capture(batch))
        with torch.set_grad_enabled(grad), _autocast(device, autocast):
            outputs = model(**inputs, **kwargs)
        # Statistics of the forward first: the backward of gradient consumers may free the graph's buffers.
        logits_ok = torch.isfinite(_logits(outputs).detach()).all()
        for c in sorted(consumers, key=lambda c: c.needs_backward):
            with torch.set_grad_enabled(c.needs_backward):
                c.consume(batch, outputs)
    flags = [f for f in (getattr(c, "finite_flag", lambda: None)() for c in consumers) if f is not None]
    acc_ok = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=logits_ok.device)
    return logits_ok, acc_ok


def pass_settings(cfg: Any, pcfg: PipelineConfig, corpus_key: str, world_size: int) -> dict[str, Any]:
    """Everything that decides the accumulators of a pass (the checkpoint fingerprint)."""
    score = json.loads(cfg.to_json())
    score.pop("device", None)  # a resumed run may move device; float results may then differ slightly
    return {"score": score, "max_tokens": pcfg.max_tokens, "bucket": pcfg.bucket, "autocast": pcfg.autocast,
            "corpus": corpus_key, "world_size": world_size}


@dataclass
class PassResult:
    """consumers (reduced over ranks), examples seen by this rank, batch/padding statistics, timings."""

    consumers: list[BatchConsumer]
    examples: int
    stats: dict[str, Any] = field(default_factory=dict)


def run_pass(
    ctx: PipelineContext,
    corpus: TokenizedCorpus,
    consumers: list[BatchConsumer],
    env: DistEnv,
    *,
    progress: bool = True,
) -> PassResult:
    """Run the streamed pass of ``consumers`` over this rank's shard of ``corpus``; reduce over ranks."""
    cfg, pcfg = ctx.config, ctx.pipeline
    lengths = corpus.lengths()
    plan = plan_batches(lengths, batch_size=cfg.batch_size, max_tokens=pcfg.max_tokens, bucket=pcfg.bucket, seed=cfg.seed)
    mine = shard_batches(plan, env.rank, env.world_size)
    settings = pass_settings(cfg, pcfg, corpus.key, env.world_size)
    if pcfg.until_stable:
        settings["until_stable"] = [pcfg.stable_tau, pcfg.check_every, pcfg.stable_checks]
    ckpt = rank_file(pcfg.checkpoint, env.rank, env.world_size) if pcfg.checkpoint else None

    cursor, examples, saved = 0, 0, None
    stable = _StabilityWatch(ctx, consumers, env, plan) if pcfg.until_stable else None
    if ckpt is not None and pcfg.resume:
        state = load_checkpoint(ckpt, settings)
        if state is not None:
            for c in consumers:
                c.load_state_dict(state["consumers"][c.name])
            cursor, examples = int(state["cursor"]), int(state["examples"])
            if stable is not None:
                stable.load_state_dict(state.get("extra", {}).get("until_stable", {}))
            saved = cursor
            print(f"fastsel: rank {env.rank} resumes at batch {cursor}/{len(mine)} ({examples} examples done) from {ckpt}",
                  file=sys.stderr)
        else:
            print(f"fastsel: no checkpoint at {ckpt}; starting from the beginning", file=sys.stderr)

    def save(complete: bool = False) -> None:
        nonlocal saved
        if ckpt is not None:
            saved = cursor
            save_checkpoint(ckpt, settings=settings, cursor=cursor, examples=examples,
                            consumers={c.name: c.state_dict() for c in consumers}, complete=complete,
                            extra={"until_stable": stable.state_dict()} if stable is not None else None)

    every = max(1, math.ceil(pcfg.checkpoint_every / env.world_size))  # per rank
    total = int(sum(len(b) for b in mine))
    model = ctx.model
    was_training = model.training
    model.eval()
    start_at = len(mine) if stable is not None and stable.stopped else cursor  # a stopped run stays stopped
    reader = BatchReader(corpus, ctx.tokenizer, mine, start=start_at, prefetch=pcfg.prefetch,
                         pin_memory=ctx.device.type == "cuda")
    tokens, since_save = 0, 0
    start = time.perf_counter()
    names = ",".join(c.name for c in consumers)
    try:
        with progress_bar(total=total, desc=f"{names} (rank {env.rank}/{env.world_size})" if env.world_size > 1 else names,
                          unit="ex", disable=not progress or not env.is_main) as bar:
            bar.initial = bar.n = examples  # resumed work: counted, but not in the rate and ETA
            for batch in reader:
                batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
                B = int(batch["input_ids"].shape[0])
                logits_ok, acc_ok = _step(model, consumers, batch, pcfg.autocast, ctx.device)
                if not bool(torch.stack([logits_ok, acc_ok]).all()):  # the one host sync of the batch
                    raise _nonfinite_error(ctx, consumers, batch, cursor, env.rank, env.world_size, pcfg.autocast,
                                           bool(logits_ok), saved)
                cursor += 1
                examples += B
                since_save += B
                tokens += int(batch["attention_mask"].sum())
                bar.update(B)
                elapsed = time.perf_counter() - start
                if elapsed > 0:
                    bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s", refresh=False)
                if stable is not None and stable.due(cursor) and stable.check(cursor, examples):
                    break
                if since_save >= every and cursor < len(mine):
                    save()
                    since_save = 0
    finally:
        model.train(was_training)
    save(complete=True)
    seconds = time.perf_counter() - start
    if env.active:
        for c in consumers:
            c.all_reduce(None)
    pad = padding_stats(lengths, plan)
    stats = {"batches": len(plan), "seconds_pass": round(seconds, 3), "tokens_this_run_rank0": tokens,
             "padding_fraction": round(pad["padding_fraction"], 5), "world_size": env.world_size,
             "max_tokens": pcfg.max_tokens, "bucket": pcfg.bucket, "autocast": pcfg.autocast}
    if stable is not None:
        stats["until_stable"] = stable.report(len(corpus))
    return PassResult(consumers, examples, stats)


class _StabilityWatch:
    """--until-stable: every ``check_every`` examples (a fixed number of batches per rank, the same points on
    every rank and on resume), the ranking of each consumer on the groups so far (reduced over the ranks):
    stable when, for every consumer, Kendall tau between the halves >= stable_tau and the top-3 set of the
    ranking on all groups is the same over the last ``stable_checks`` checks."""

    def __init__(self, ctx: PipelineContext, consumers: list[BatchConsumer], env: DistEnv, plan: list) -> None:
        from fastsel.confidence import halves

        self.ctx, self.consumers, self.env = ctx, consumers, env
        self.pcfg = ctx.pipeline
        self.k = confidence_groups(ctx.config)
        if self.k < 2:
            raise ValueError("fastsel: --until-stable needs the ranking confidence (--confidence-groups K >= 2, not 0)")
        for c in consumers:
            if not hasattr(c, "stability_scores"):
                raise ValueError(f"fastsel: --until-stable: metric {c.name!r} has no ranking confidence")
        self.halves = halves(self.k)
        total = max(1, ctx.num_examples)
        per_batch = total / max(1, len(plan))
        self.batches = max(1, round(self.pcfg.check_every / per_batch / env.world_size))  # per rank, per check
        self.last = len(plan) // env.world_size  # every rank has at least this many batches
        self.history: list[dict[str, Any]] = []
        self.stopped = False

    def due(self, cursor: int) -> bool:
        return cursor % self.batches == 0 and cursor <= self.last

    def check(self, cursor: int, examples: int) -> bool:
        """One check (a collective under torchrun); True: stop now."""
        from fastsel.confidence import _ranking, kendall_tau_b

        entry: dict[str, Any] = {"batches_per_rank": cursor}
        ok = True
        for c in self.consumers:
            scores_of = c.stability_scores(self.env.active)  # type: ignore[attr-defined]
            try:
                full, a, b = scores_of(list(range(self.k))), scores_of(self.halves[0]), scores_of(self.halves[1])
                tau = kendall_tau_b(a, b)
                from fastsel.scoring import METRICS

                hib = METRICS[c.name].higher_is_better if c.name in METRICS else True
                top = sorted(_ranking(full, hib)[:3])
            except ValueError:  # too few examples per class in a half
                tau, top = float("nan"), None
            entry[c.name] = {"kendall_tau_halves": None if math.isnan(tau) else round(tau, 6), "top3": top}
            recent = [h[c.name]["top3"] for h in self.history[-(self.pcfg.stable_checks - 1):]] if self.pcfg.stable_checks > 1 else []
            ok = ok and not math.isnan(tau) and tau >= self.pcfg.stable_tau and top is not None and \
                len(recent) == self.pcfg.stable_checks - 1 and all(r == top for r in recent)
        flag = torch.tensor([1.0 if ok else 0.0, float(examples)], dtype=torch.float64, device=self.ctx.device)
        if self.env.active:  # every rank takes the same decision
            all_reduce_sum_([flag])
        ok = float(flag[0]) > 0
        entry["examples"] = int(flag[1])
        self.history.append(entry)
        self.stopped = ok
        return ok

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "stopped": self.stopped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.stopped = bool(state.get("stopped", False))

    def report(self, total: int) -> dict[str, Any]:
        used = self.history[-1]["examples"] if self.stopped else total
        d = {"stable": self.stopped, "reached_end": not self.stopped, "examples_used": used, "examples_available": total,
             "stable_tau": self.pcfg.stable_tau, "check_every": self.pcfg.check_every,
             "stable_checks": self.pcfg.stable_checks, "checks": self.history}
        if not self.stopped and self.env.is_main:
            print(f"fastsel: note: --until-stable reached the end of the data ({total} examples) before the ranking was "
                  f"stable (Kendall tau between halves >= {self.pcfg.stable_tau} and the top-3 unchanged over "
                  f"{self.pcfg.stable_checks} checks); the scores use all of it", file=sys.stderr)
            d["note"] = "reached the end of the data before the ranking was stable"
        return d


def output_path(path: str | os.PathLike, metric: str, num_metrics: int) -> Path:
    """``path`` itself for one metric; ``scores.json`` -> ``scores.fisher.json`` for several."""
    path = Path(path)
    return path if num_metrics == 1 else path.with_name(f"{path.stem}.{metric}{path.suffix}")


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from fastsel.models import ModelLoadError, _quiet_transformers, resolve_model_path

    path = resolve_model_path(name)
    local = Path(path).is_dir()
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError) as exc:
        where = "local directory" if local else "name (not a local directory; the hub is needed, which may be offline)"
        raise ModelLoadError(f"fastsel: could not load model {name!r} as a {where}: {exc}") from exc


def run_pipeline(
    cfg: Any,
    pcfg: PipelineConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, LayerScores]:
    """Score ``cfg.metric`` (comma-separated metrics: one shared pass) -> {metric: LayerScores}.

    Under torchrun every rank returns the reduced scores; only rank 0 writes ``out`` / ``plot``
    (``output_path`` names one file per metric when there are several).
    """
    pcfg = pcfg or PipelineConfig()
    names = cfg.metric.split(",")
    if len(set(names)) != len(names):
        raise ValueError(f"fastsel: metric listed twice in {cfg.metric!r}")
    missing = [n for n in names if n not in CONSUMERS]
    if missing:
        raise ValueError(f"fastsel: metric(s) {missing} cannot run in the streamed pass; streamed: {sorted(CONSUMERS)}")
    from fastsel.distributed import PeerFailure
    from fastsel.scoring import apply_length_limit

    if pcfg.until_stable and confidence_groups(cfg) < 2:
        raise ValueError("fastsel: --until-stable needs the ranking confidence (--confidence-groups K >= 2, not 0)")
    limit = apply_length_limit(cfg)  # before the corpus key: the cache holds the clamped lengths
    env = init_distributed(cfg.device, pcfg.dist_timeout)
    try:
        return _run_pipeline(cfg, pcfg, env, names, limit, out, plot, progress)
    except PeerFailure as exc:
        if pcfg.checkpoint:
            raise PeerFailure(f"{exc}; the checkpoints in {pcfg.checkpoint} stay loadable: rerun the same command with "
                              "--resume to continue") from None
        raise
    finally:
        shutdown_distributed(env)


def _run_pipeline(cfg: Any, pcfg: PipelineConfig, env: DistEnv, names: list[str], limit: int | None,
                  out: str | os.PathLike | None, plot: str | os.PathLike | None, progress: bool) -> dict[str, LayerScores]:
    from fastsel.models import load_model
    from fastsel.scoring import METRICS, check_scores_finite

    if env.world_size > 1 and env.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))))
    tokenizer = _load_tokenizer(cfg.model)
    # Rank 0 tokenises into the cache; the others then memory-map the same file.
    if env.is_main:
        corpus = load_tokenized_corpus(cfg, tokenizer, pcfg.cache_dir)
    barrier(env)
    if not env.is_main:
        corpus = load_tokenized_corpus(cfg, tokenizer, pcfg.cache_dir)
    task = corpus.task
    for name in names:
        if METRICS[name].classification_only and task.is_regression:
            raise ValueError(f"fastsel: metric {name!r} needs classes, but task {task.name!r} is a regression task")
    model, tokenizer, layer_map = load_model(cfg.model, num_labels=1 if task.is_regression else task.num_labels,
                                             seed=cfg.seed, device=env.device)
    ctx = PipelineContext(cfg, pcfg, model, tokenizer, layer_map, task, env.device, len(corpus))
    consumers = [CONSUMERS[n](ctx) for n in names]
    start = time.perf_counter()
    result = run_pass(ctx, corpus, consumers, env, progress=progress)
    scores = {c.name: c.result() for c in result.consumers}
    seconds = round(time.perf_counter() - start, 3)
    for s in scores.values():
        check_scores_finite(s)
        s.info.setdefault("max_length_limit", limit)
        s.info.setdefault("seconds", seconds)
        s.info.setdefault("config", json.loads(cfg.to_json()))
        s.info.setdefault("pipeline", {k: v for k, v in result.stats.items() if k != "until_stable"})
        if "until_stable" in result.stats:
            s.info["until_stable"] = result.stats["until_stable"]
    if env.is_main:
        for name, s in scores.items():
            if out:
                s.to_json(output_path(out, name, len(names)))
            if plot:
                from fastsel.plot import plot_layer_scores

                (METRICS[name].plot or plot_layer_scores)(s, output_path(plot, name, len(names)))
    barrier(env)
    return scores
