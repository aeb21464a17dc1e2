"""The scoring pass over large corpora: streamed batches, several metrics from one forward, several
processes, checkpoints and resume.

One pass feeds every *consumer* (one per metric) from the same forward::

    with every consumer's pass_hooks():                                   # module hooks registered once
    for batch in BatchReader(corpus, schedule[rank::K], start=cursor):     # memory-mapped, bucketed, prefetched
        with every consumer's capture(batch):                         # Fisher: per-example gradient hooks
            outputs = model(**inputs, output_hidden_states=any needs) # under optional bf16/fp16 autocast
            for c in consumers: c.consume(batch, outputs)             # no-backward consumers first
        every M examples: checkpoint {consumer states, cursor}        # atomic, one file per rank
    for c in consumers: c.all_reduce(group)                           # sums / exact merges over ranks
    rank 0: c.result() -> LayerScores -> scores.json (atomic)

A metric joins the pass with a consumer, a :class:`fastsel.pipeline.registry.BatchConsumer` subclass (every hook
the pass calls is declared there), registered with ``register_metric(Metric(name, run=..., consumer=...))``; the
drivers in :mod:`fastsel.pipeline.drivers` register the Fisher and variability consumers. Consumers that keep
per-class statistics merge them exactly with :func:`merge_class_stats` (Chan et al.). A non-finite batch is
diagnosed by :mod:`fastsel.pipeline.diagnosis`; ``--until-stable`` is :mod:`fastsel.pipeline.stability`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fastsel.data.corpus import (
    BatchReader,
    TokenizedCorpus,
    batch_to_device,
    load_tokenized_corpus,
    padding_stats,
    schedule_batches,
    shard_batches,
)
from fastsel.hf.io import eval_mode, logits_of, model_inputs
from fastsel.hf.loading import load_model, load_tokenizer
from fastsel.pipeline.checkpoint import load_checkpoint, rank_file, remove_checkpoint, save_checkpoint
from fastsel.pipeline.checks import apply_length_limit
from fastsel.pipeline.config import PipelineConfig, ScoreConfig
from fastsel.pipeline.context import PipelineContext
from fastsel.pipeline.cuda_graphs import GraphSteps, check_cuda_graphs
from fastsel.pipeline.diagnosis import FiniteChecks
from fastsel.pipeline.distributed import DistEnv, PeerFailure, barrier, init_distributed, shutdown_distributed
from fastsel.pipeline.outputs import check_metrics_fit_task, finish_scores, write_scores
from fastsel.pipeline.registry import METRICS, BatchConsumer, autocast_context
from fastsel.pipeline.stability import StabilityWatch
from fastsel.scores.layer_scores import LayerScores
from fastsel.utils.groups import with_groups
from fastsel.utils.progress import progress_bar

__all__ = ["run_pass", "run_pipeline", "PassResult", "pass_settings"]


def _step(model: nn.Module, consumers: list[BatchConsumer], batch: dict[str, Tensor], autocast: str,
          device: torch.device) -> Tensor:
    """One batch through the model, shared by all consumers (see the module docstring).

    Returns a 0-dim bool tensor (not synchronised): the logits are finite (the accumulators are checked every
    ``--finite-check-every`` batches, :class:`fastsel.pipeline.diagnosis.FiniteChecks`).
    """
    inputs = model_inputs(batch)
    grad = any(c.needs_backward for c in consumers)
    hidden = any(c.needs_hidden_states for c in consumers)
    kwargs = {"output_hidden_states": True} if hidden else {}
    with contextlib.ExitStack() as stack:
        for c in consumers:
            stack.enter_context(c.capture(batch))
        with torch.set_grad_enabled(grad), autocast_context(device, autocast):
            outputs = model(**inputs, **kwargs)
        # Statistics of the forward first: the backward of gradient consumers may free the graph's buffers.
        logits_ok = torch.isfinite(logits_of(outputs).detach()).all()
        for c in sorted(consumers, key=lambda c: c.needs_backward):
            with torch.set_grad_enabled(c.needs_backward):
                c.consume(batch, outputs)
    return logits_ok


def pass_settings(cfg: ScoreConfig, pcfg: PipelineConfig, corpus_key: str, world_size: int) -> dict[str, Any]:
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
    for c in consumers:
        if not isinstance(c, BatchConsumer):
            raise TypeError(f"fastsel: the streamed pass drives BatchConsumer subclasses (fastsel.pipeline.registry), "
                            f"not {type(c).__name__}")
    cfg, pcfg = ctx.config, ctx.pipeline
    lengths = corpus.lengths()
    schedule = schedule_batches(lengths, batch_size=cfg.batch_size, max_tokens=pcfg.max_tokens, bucket=pcfg.bucket, seed=cfg.seed)
    mine = shard_batches(schedule, env.rank, env.world_size)
    settings = pass_settings(cfg, pcfg, corpus.key, env.world_size)
    if pcfg.until_stable:
        settings["until_stable"] = [pcfg.stable_tau, pcfg.check_every_examples, pcfg.stable_checks]
    ckpt = rank_file(pcfg.checkpoint_dir, env.rank, env.world_size) if pcfg.checkpoint_dir else None

    cursor, examples, saved = 0, 0, None
    stable = StabilityWatch(ctx, consumers, env, schedule) if pcfg.until_stable else None
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

    every = max(1, math.ceil(pcfg.checkpoint_every_examples / env.world_size))  # per rank
    total = int(sum(len(b) for b in mine))
    model = ctx.model
    start_at = len(mine) if stable is not None and stable.stopped else cursor  # a stopped run stays stopped
    reader = BatchReader(corpus, ctx.tokenizer, mine, start=start_at, prefetch=pcfg.prefetch,
                         pin_memory=ctx.device.type == "cuda")
    tokens, since_save = 0, 0
    start = time.perf_counter()
    names = ",".join(c.name for c in consumers)
    graphs = GraphSteps.for_pass(ctx, consumers, _step)  # --cuda-graphs; eager (off, auto today): graphs.step is _step
    finite = FiniteChecks(ctx, consumers, _step, pcfg.finite_check_every, env.rank, env.world_size)
    # --confidence-groups K: whole batches (batch b of the global schedule in group b mod K; this rank's i-th batch
    # is b = i * world + rank) when there are enough, else index mod K (fastsel.scores.confidence.group_unit)
    k = cfg.confidence_groups
    by_batch = bool(k) and ctx.confidence_unit == "batches"
    with eval_mode(model), contextlib.ExitStack() as hooks:
        for c in consumers:  # module hooks registered once for the pass, not per batch
            hooks.enter_context(c.pass_hooks())
        with progress_bar(total=total, desc=f"{names} (rank {env.rank}/{env.world_size})" if env.world_size > 1 else names,
                          unit="ex", disable=not progress or not env.is_main) as bar:
            bar.initial = bar.n = examples  # resumed work: counted, but not in the rate and ETA
            for host in reader:
                if k:  # this batch's group, or each row's (sorted: consumers split the batch by views)
                    host = with_groups(host, k, (cursor * env.world_size + env.rank) % k if by_batch else None)
                batch = batch_to_device(host, ctx.device)
                B = int(host["input_ids"].shape[0])
                finite.add(cursor, host, graphs.step(model, consumers, batch, pcfg.autocast, ctx.device))
                cursor += 1
                examples += B
                since_save += B
                tokens += int(host["attention_mask"].sum())  # on the host: no device sync
                bar.update(B)
                elapsed = time.perf_counter() - start
                if elapsed > 0:
                    bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s", refresh=False)
                if finite.due:  # every --finite-check-every batches: the pass's one host sync
                    finite.check(saved)
                if stable is not None and stable.due(cursor):
                    finite.check(saved)
                    if stable.check(cursor, examples):
                        break
                if since_save >= every and cursor < len(mine):
                    finite.check(saved)  # a checkpoint holds finite sums only
                    save()
                    since_save = 0
            finite.check(saved)
    save(complete=True)
    seconds = time.perf_counter() - start
    if env.active:
        for c in consumers:
            c.all_reduce(None)
    pad = padding_stats(lengths, schedule)
    stats = {"batches": len(schedule), "seconds_pass": round(seconds, 3), "tokens_this_run_rank0": tokens,
             "padding_fraction": round(pad["padding_fraction"], 5), "world_size": env.world_size,
             "max_tokens": pcfg.max_tokens, "bucket": pcfg.bucket, "autocast": pcfg.autocast, "prefetch": pcfg.prefetch,
             "checkpoint_dir": pcfg.checkpoint_dir, "checkpoint_every_examples": pcfg.checkpoint_every_examples if pcfg.checkpoint_dir else None,
             "dist_timeout": pcfg.dist_timeout, "cuda_graphs": graphs.report(cursor - start_at),
             "finite_check_every": pcfg.finite_check_every, "finite_checks": finite.checks}
    if stable is not None:
        stats["until_stable"] = stable.report(len(corpus))
    return PassResult(consumers, examples, stats)


def run_pipeline(
    cfg: ScoreConfig,
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
    streamed = sorted(n for n, m in METRICS.items() if m.consumer is not None)
    missing = [n for n in names if n not in streamed]
    if missing:
        raise ValueError(f"fastsel: metric(s) {missing} cannot run in the streamed pass; streamed: {streamed}")

    check_cuda_graphs(pcfg.cuda_graphs, cfg.device)  # --cuda-graphs on without CUDA: before the model is loaded
    if pcfg.until_stable and cfg.confidence_groups < 2:
        raise ValueError("fastsel: --until-stable needs the ranking confidence (--confidence-groups K >= 2, not 0)")
    limit = apply_length_limit(cfg)  # before the corpus key: the cache holds the clamped lengths
    env = init_distributed(cfg.device, pcfg.dist_timeout)
    try:
        return _run_pipeline(cfg, pcfg, env, names, limit, out, plot, progress)
    except PeerFailure as exc:
        if pcfg.checkpoint_dir:
            raise PeerFailure(f"{exc}; the checkpoints in {pcfg.checkpoint_dir} stay loadable: rerun the same command with "
                              "--resume to continue") from None
        raise
    finally:
        shutdown_distributed(env)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (a GPU's free memory; the machine's available memory), or None."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            try:
                import psutil

                return int(psutil.virtual_memory().available)
            except ImportError:
                return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (RuntimeError, ValueError, OSError, AttributeError):
        return None
    return None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} TB"


def check_confidence_groups(ctx: PipelineContext, names: list[str]) -> None:
    """One-line ValueError for a ``--confidence-groups K`` that cannot work: more groups than examples scored (or,
    with ``--confidence-unit batches``, than batches), or (Fisher) accumulators, K sums of the blocks' parameters
    and one of the others (float32), above half of the memory available."""
    cfg = ctx.config
    k = cfg.confidence_groups
    if k == 0:
        return
    if k > ctx.num_examples:
        raise ValueError(f"fastsel: --confidence-groups {k} is more than the {ctx.num_examples} examples scored (each "
                         f"group needs examples): use at most --confidence-groups {ctx.num_examples}, or 0 (off)")
    batches = math.ceil(ctx.num_examples / cfg.batch_size)  # the schedule's, without --max-tokens (which adds batches)
    if cfg.confidence_unit == "batches" and ctx.pipeline.max_tokens is None and k > batches:
        raise ValueError(f"fastsel: --confidence-unit batches: --confidence-groups {k} is more than the {batches} "
                         f"batches of the pass (each group needs batches): use --confidence-unit examples, or fewer "
                         f"groups")
    if "fisher" not in names:
        return
    trainable = {n: p.numel() for n, p in ctx.model.named_parameters() if p.requires_grad}
    named = ctx.layer_map.groups(ctx.model)
    blocks = sum(trainable.get(n, 0) for l in range(ctx.layer_map.num_layers) for n in set(named[f"layer.{l}"]))
    params = sum(trainable.values())
    need, free = (k * blocks + params - blocks) * 4, available_memory(ctx.device)
    if params and free is not None and need > free // 2:
        most = (free // 2 // 4 - (params - blocks)) // max(1, blocks)
        fix = f"use --confidence-groups {most} or fewer, or 0 (off)" if most >= 2 else "use --confidence-groups 0 (off)"
        raise ValueError(f"fastsel: --confidence-groups {k}: the Fisher accumulators would take about {_size(need)} "
                         f"(K x {blocks:,} float32 parameters of the blocks, 1 x the other {params - blocks:,}), more "
                         f"than half of the {_size(free)} of memory available on {ctx.device}: {fix}")


def _run_pipeline(cfg: ScoreConfig, pcfg: PipelineConfig, env: DistEnv, names: list[str], limit: int | None,
                  out: str | os.PathLike | None, plot: str | os.PathLike | None, progress: bool) -> dict[str, LayerScores]:

    if env.world_size > 1 and env.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))))
    tokenizer = load_tokenizer(cfg.model)
    # Rank 0 tokenises into the cache; the others then memory-map the same file.
    if env.is_main:
        corpus = load_tokenized_corpus(cfg, tokenizer, pcfg.cache_dir)
    barrier(env)
    if not env.is_main:
        corpus = load_tokenized_corpus(cfg, tokenizer, pcfg.cache_dir)
    task = corpus.task
    check_metrics_fit_task(names, task)
    model, tokenizer, layer_map = load_model(cfg.model, num_labels=1 if task.is_regression else task.num_labels,
                                             seed=cfg.seed, device=env.device)
    ctx = PipelineContext(cfg, pcfg, model, tokenizer, layer_map, task, env.device, len(corpus), corpus,
                          progress=progress)
    check_confidence_groups(ctx, names)  # before a head is fitted or an accumulator allocated
    consumers = [METRICS[n].consumer(ctx) for n in names]  # type: ignore[misc]  (checked above: all stream)
    start = time.perf_counter()
    result = run_pass(ctx, corpus, consumers, env, progress=progress)
    scores = {c.name: c.result() for c in result.consumers}
    seconds = time.perf_counter() - start
    for s in scores.values():
        finish_scores(s, cfg, seconds=seconds, max_length_limit=limit)
        s.info.setdefault("pipeline", {k: v for k, v in result.stats.items() if k != "until_stable"})
        if "until_stable" in result.stats:
            s.info["until_stable"] = result.stats["until_stable"]
    if env.is_main:
        write_scores(scores, out, plot)
    barrier(env)
    if pcfg.checkpoint_dir and not pcfg.keep_checkpoints:  # the run is done: its checkpoints are no longer needed
        remove_checkpoint(rank_file(pcfg.checkpoint_dir, env.rank, env.world_size))
    return scores
