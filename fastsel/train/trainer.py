"""Training a planned model: loop, evaluation, checkpoints, cached frozen prefix, rank stability, HF Trainer glue.

- :func:`train_model`: AdamW over the trainable parameters only, linear decay after a warmup ratio,
  gradient clipping, evaluation after every epoch with the task's official metrics, best epoch kept
  (its trainable parameters are restored at the end), seeded shuffling / dropout.
- :class:`PrefixCache`: when the embeddings and blocks 0..c-1 are frozen and the data is fixed, their
  output (B, T, H) is computed once (eval mode, so without dropout) and blocks c.. train on the cache. It
  is exact whenever the frozen part would run without dropout anyway.
- :func:`save_trained` / :func:`load_trained`: only the trained parameters (safetensors) plus the plan;
  loading re-applies the plan to the base model and loads them.
- :class:`RankStability`: re-computes the Fisher layer ranking at chosen epochs and reports per-layer rank
  deviation and Kendall's tau against epoch 0 (Lodha et al. section 4, Figs 2-5).
- :func:`trainer_callback`: wraps epoch callbacks for ``transformers.Trainer`` (whose optimizer, like
  ours, only takes parameters with requires_grad).
- :func:`run_finetune`: ``fastsel finetune``: score -> plan -> train -> results.json + curve plot.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastsel.capture.prefix_cache import PrefixCache, index_batches
from fastsel.data.task_metrics import main_metric, predictions_from_logits, task_metrics
from fastsel.data.features import PadCollator, make_dataloader, tokenize_examples
from fastsel.data.examples import Examples, subsample
from fastsel.data.readers import load_custom_examples, load_examples
from fastsel.data.specs import TaskSpec, get_task
from fastsel.hf.io import eval_mode, model_inputs
from fastsel.hf.layer_map import map_layers
from fastsel.hf.loading import clamp_max_length, load_model
from fastsel.pipeline.checkpoint import fingerprint, load_fingerprinted
from fastsel.pipeline.checks import NonFiniteError, first_nonfinite_parameter
from fastsel.pipeline.config import ScoreConfig
from fastsel.pipeline.heads import HeadRequest, parse_head, prepare_head
from fastsel.pipeline.inmemory import run_scoring
from fastsel.pipeline.registry import METRICS
from fastsel.plans.plan import LoraSpec, Plan, PlanError
from fastsel.plans.strategies import build_plan, find_strategy
from fastsel.scores.fisher import fisher_layer_scores
from fastsel.scores.layer_scores import LayerScores
from fastsel.train.export import EXPORT_DIR, export_trained, tuning_summary
from fastsel.tuners.apply import (
    apply_plan,
    is_added_parameter,
    trainable_parameters,
    with_counts,
)
from fastsel.utils.atomic import atomic_savefig, atomic_write, atomic_write_json
from fastsel.utils.progress import progress_bar

__all__ = [
    "TrainConfig",
    "EpochRecord",
    "TrainResult",
    "EpochCallback",
    "make_optimizer",
    "evaluate",
    "train_model",
    "cacheable_prefix",
    "save_trained",
    "load_trained",
    "RankStability",
    "trainer_callback",
    "FinetuneJob",
    "RANK_SPLITS",
    "RANK_CALLBACK_NAMES",
    "run_finetune",
    "peak_memory_mb",
]


@dataclass
class TrainConfig:
    """Optimisation settings; validated on construction, round-trips through JSON (``asdict``)."""

    epochs: int = 3
    lr: float = 2e-5
    batch_size: int = 16
    eval_batch_size: int = 64
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    device: str = "cpu"
    cache_prefix: str = "auto"  # auto | on | off
    progress: bool = True
    checkpoint: str | None = None  # training-state file (atomic): trainable params, optimizer, scheduler, RNG, position
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0: at the end of every epoch only)
    resume: bool = False  # continue from ``checkpoint`` when it exists

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"fastsel: epochs must be >= 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"fastsel: lr must be a finite number > 0, got {self.lr}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("fastsel: batch sizes must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"fastsel: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.cache_prefix not in ("auto", "on", "off"):
            raise ValueError(f"fastsel: cache_prefix must be auto, on or off, got {self.cache_prefix!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"fastsel: checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.resume and not self.checkpoint:
            raise ValueError("fastsel: resume needs a checkpoint path")


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_seconds: float
    eval_seconds: float
    metrics: dict[str, float]
    eval_loss: float | None = None


@dataclass
class TrainResult:
    history: list[EpochRecord]
    best_epoch: int
    best_metrics: dict[str, float]
    main_metric: str
    trainable_params: int
    cache: dict[str, Any] | None = None
    peak_memory_mb: float | None = None
    callbacks: dict[str, Any] = field(default_factory=dict)
    extensions: list[dict[str, Any]] = field(default_factory=list)  # resumes with another number of epochs

    @property
    def epoch_seconds_mean(self) -> float:
        return float(np.mean([r.train_seconds for r in self.history]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "history": [asdict(r) for r in self.history],
            "best": {"epoch": self.best_epoch, "metrics": self.best_metrics},
            "main_metric": self.main_metric,
            "trainable_params": self.trainable_params,
            "epoch_seconds_mean": self.epoch_seconds_mean,
            "cache": self.cache,
            "peak_memory_mb": self.peak_memory_mb,
            "callbacks": self.callbacks,
            "extensions": self.extensions,
        }


class EpochCallback(Protocol):
    """Called with epoch 0 before training and with e = 1..E after each epoch's evaluation."""

    name: str

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None: ...

    def report(self) -> Any: ...


def peak_memory_mb(device: str | torch.device = "cpu") -> float:
    """Peak memory: CUDA max allocated on a GPU, else this process's peak resident set size (whole process).

    On Linux VmHWM is read from /proc/self/status: unlike ``ru_maxrss``, which a child inherits from its
    parent across fork + exec, it belongs to this process alone.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


# --------------------------------------------------------------------------------------------------
# Optimiser and batching
# --------------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    """AdamW over the parameters with requires_grad only, and a linear schedule with warmup."""
    from transformers import get_linear_schedule_with_warmup

    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise PlanError("fastsel: the plan leaves no parameter to train")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def cacheable_prefix(plan: Plan) -> int:
    """Number c of bottom blocks whose output can be cached: embeddings and blocks 0..c-1 frozen (0: none)."""
    if plan.embeddings.trains:
        return 0
    first = plan.first_trained_layer
    return plan.head_at + 1 if first is None else first


# --------------------------------------------------------------------------------------------------
# Evaluation and training
# --------------------------------------------------------------------------------------------------


def evaluate(model: nn.Module, features: Sequence[dict], task: TaskSpec | str, collator: PadCollator, *,
             batch_size: int = 64, device: str | torch.device = "cpu", cache: PrefixCache | None = None,
             ) -> tuple[dict[str, float], float, np.ndarray]:
    """(official metrics, mean loss, predictions (N,)) of ``model`` on labelled ``features``."""
    spec = get_task(task)
    if not features:
        raise ValueError("fastsel: no evaluation examples")
    logits, labels, loss_sum = [], [], 0.0
    with eval_mode(model), torch.no_grad(), (cache.activate(model) if cache else contextlib.nullcontext()):
        for idx in index_batches(len(features), batch_size, shuffle=False, seed=0):
            batch = {k: v.to(device) for k, v in collator([features[i] for i in idx]).items()}
            if cache is not None:
                cache.set_batch(idx)
            out = model(**model_inputs(batch, labels=True))
            loss_sum += float(out.loss) * len(idx)
            logits.append(out.logits.float().cpu())
            labels.append(batch["labels"].cpu())
    pred = predictions_from_logits(torch.cat(logits).numpy(), spec.is_regression)
    gold = torch.cat(labels).numpy()
    return task_metrics(spec, pred, gold), loss_sum / len(features), pred


def _trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in trainable_parameters(model)}


# --------------------------------------------------------------------------------------------------
# Training checkpoints: everything that decides the rest of the run, written atomically
# --------------------------------------------------------------------------------------------------

_TRAIN_FORMAT = "fastsel-train-checkpoint-1"


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train_settings(cfg: TrainConfig, plan: Plan, train_features: Sequence[dict], eval_features: Sequence[dict]) -> dict:
    """What decides a training run (the checkpoint's fingerprint): settings, plan and a hash of the data."""
    h = hashlib.sha256()
    for part, feats in (("train", train_features), ("eval", eval_features)):
        h.update(part.encode())
        for f in feats:
            h.update(np.asarray(f["input_ids"], dtype=np.int64).tobytes())
            h.update(repr(f.get("labels")).encode())
    # epochs is left out: resuming with more (or fewer) epochs extends the run (train_model says so and records it)
    train = {k: v for k, v in asdict(cfg).items()
             if k not in ("progress", "checkpoint", "checkpoint_every", "resume", "device", "epochs")}
    return {"train": train, "plan": plan.to_dict(), "data": h.hexdigest(), "num_train": len(train_features),
            "num_eval": len(eval_features)}


def save_train_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save of ``state`` to a temporary file beside ``path``, fsync'ed and renamed over it."""
    atomic_write(path, lambda f: torch.save({"format": _TRAIN_FORMAT, **state}, f), binary=True)


def load_train_checkpoint(path: str | Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The training checkpoint at ``path`` (None when there is none); CheckpointMismatch when it is another run's."""
    return load_fingerprinted(path, settings, format=_TRAIN_FORMAT, keys={"fingerprint", "params", "optimizer"},
                              what="training checkpoint",
                              not_ours="is not a fastsel training checkpoint; delete it and rerun without --resume "
                                       "(training starts over)",
                              start_over="delete it and rerun without --resume (training starts over)")


def _check_extension(state: dict[str, Any], cfg: TrainConfig, steps_per_epoch: int) -> dict[str, Any] | None:
    """None when the checkpoint was written with ``cfg.epochs``; else the record of the extension (or shortening)
    to ``cfg.epochs``, or a one-line ValueError when ``cfg.epochs`` would end before what was already trained."""
    saved = int(state.get("epochs", cfg.epochs))
    if saved == cfg.epochs:
        return None
    done = state["epoch"] - 1 + (1 if state["batch"] else 0)  # epochs begun; a begun epoch is finished first
    if cfg.epochs < done:
        raise ValueError(f"fastsel: --epochs {cfg.epochs}: the training checkpoint has trained {state['epoch'] - 1} "
                         f"epoch(s){' and part of the next' if state['batch'] else ''} already; give --epochs {done} or "
                         "more to continue it")
    return {"from_epochs": saved, "to_epochs": cfg.epochs, "at_step": int(state["step"]),
            "at_epoch": int(state["epoch"]), "at_batch": int(state["batch"]),
            "note": (f"training goes on to {cfg.epochs} epochs instead of {saved} (from step {state['step']}): the "
                     f"learning rate follows the {cfg.epochs}-epoch schedule ({steps_per_epoch * cfg.epochs} steps) "
                     "from there, so the result is not the same as that of a run of "
                     f"{cfg.epochs} epochs from the start")}


def _nonfinite_loss(model: nn.Module, loss: float, epoch: int, step: int, saved: str | None) -> ValueError:
    name = first_nonfinite_parameter(model)
    where = f"parameter {name}" if name else "none of the parameters (the loss itself: check the labels and the inputs)"
    kept = f"; the checkpoint of {saved} is kept" if saved else ""
    return NonFiniteError(f"fastsel: the training loss is {loss} at epoch {epoch}, step {step}; first non-finite: {where}; "
                          f"nothing written{kept}; try a lower --lr, fp32, or check the model's weights")


def train_model(
    model: nn.Module,
    plan: Plan,
    train_features: Sequence[dict],
    eval_features: Sequence[dict],
    task: TaskSpec | str,
    tokenizer: Any,
    cfg: TrainConfig,
    *,
    callbacks: Sequence[EpochCallback] = (),
) -> TrainResult:
    """Train ``model`` (the plan already applied) and restore the best epoch's trainable parameters.

    Features are dicts from :func:`fastsel.data.tokenize_examples`. ``callbacks`` run at epoch 0 (before
    training) and after every epoch, on the full model (never on the cached one).
    """
    spec = get_task(task)
    if not train_features:
        raise ValueError("fastsel: no training examples")
    device = torch.device(cfg.device)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    layer_map = map_layers(model)
    collator = PadCollator(tokenizer)
    metric = main_metric(spec)
    trainable = sum(p.numel() for _, p in trainable_parameters(model))

    prefix = cacheable_prefix(plan)
    if cfg.cache_prefix == "on" and prefix == 0:
        raise PlanError("fastsel: --cache-prefix on needs frozen embeddings and a frozen bottom block")
    use_cache = prefix > 0 and cfg.cache_prefix != "off"
    train_cache = eval_cache = None
    cache_info = None
    if use_cache:
        train_cache = PrefixCache(model, layer_map, prefix, train_features, collator, cfg.eval_batch_size, device,
                                  cfg.progress, "cache train prefix")
        eval_cache = PrefixCache(model, layer_map, prefix, eval_features, collator, cfg.eval_batch_size, device,
                                 cfg.progress, "cache eval prefix")
        cache_info = {"blocks": prefix, "seconds": train_cache.seconds + eval_cache.seconds,
                      "megabytes": (train_cache.nbytes + eval_cache.nbytes) / 2**20}

    steps_per_epoch = math.ceil(len(train_features) / cfg.batch_size)
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch * cfg.epochs)
    torch.manual_seed(cfg.seed)  # dropout

    history: list[EpochRecord] = []
    extensions: list[dict[str, Any]] = []  # resumed with another --epochs: where and from what
    best_value, best_state, best_epoch = -math.inf, None, 0
    first_epoch, skip, step, resumed_loss = 1, 0, 0, 0.0
    settings = train_settings(cfg, plan, train_features, eval_features) if cfg.checkpoint else None
    state = load_train_checkpoint(cfg.checkpoint, settings) if cfg.checkpoint and cfg.resume else None  # type: ignore[arg-type]
    saved: str | None = None
    if state is not None:
        if callbacks:
            raise ValueError("fastsel: --resume does not support epoch callbacks (--rank-epochs); rerun without one of them")
        with torch.no_grad():
            for n, p in trainable_parameters(model):
                p.copy_(state["params"][n])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        extensions = list(state.get("extensions") or [])
        extension = _check_extension(state, cfg, steps_per_epoch)
        if extension is not None:
            extensions.append(extension)
        # the schedule of cfg.epochs from the saved step on (the same value when the epochs are unchanged)
        for group, base, lam in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * lam(scheduler.last_epoch)
        history = [EpochRecord(**r) for r in state["history"]]
        best_value, best_epoch, best_state = state["best_value"], state["best_epoch"], state["best_state"]
        first_epoch, skip, step, resumed_loss = state["epoch"], state["batch"], state["step"], state["loss_sum"]
        _set_rng_state(state["rng"], device)
        saved = f"step {step}"
        print(f"fastsel: resuming training at epoch {first_epoch}, batch {skip} (step {step}) from {cfg.checkpoint}",
              file=sys.stderr)
        if extension is not None:
            print(f"fastsel: {extension['note']}", file=sys.stderr)
        del state
    else:
        if cfg.resume:
            print(f"fastsel: no training checkpoint at {cfg.checkpoint}; starting from the beginning", file=sys.stderr)
        for cb in callbacks:
            cb.on_epoch_end(0, model)

    def checkpoint(epoch: int, batch: int, loss_sum: float) -> None:
        nonlocal saved
        if not cfg.checkpoint:
            return
        save_train_checkpoint(cfg.checkpoint, {
            "settings": settings, "fingerprint": fingerprint(settings),
            "params": {n: p.detach().cpu().clone() for n, p in trainable_parameters(model)},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(device),
            "epoch": epoch, "batch": batch, "step": step, "loss_sum": loss_sum, "epochs": cfg.epochs,
            "extensions": extensions,
            "history": [asdict(r) for r in history], "best_value": best_value, "best_epoch": best_epoch,
            "best_state": None if best_state is None else {n: t.detach().cpu() for n, t in best_state.items()},
        })
        saved = f"step {step}"

    for epoch in range(first_epoch, cfg.epochs + 1):
        model.train()
        start, loss_sum = time.perf_counter(), 0.0
        batches = index_batches(len(train_features), cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch)
        done = 0
        if epoch == first_epoch and skip:
            done, loss_sum = skip, resumed_loss
        with (train_cache.activate(model) if train_cache else contextlib.nullcontext()), \
                progress_bar(len(train_features), f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress) as bar:
            bar.initial = bar.n = sum(len(b) for b in batches[:done])
            for b, idx in enumerate(batches[done:], start=done):
                batch = {k: v.to(device) for k, v in collator([train_features[i] for i in idx]).items()}
                if train_cache is not None:
                    train_cache.set_batch(idx)
                loss = model(**model_inputs(batch, labels=True)).loss
                loss_value = float(loss.detach())  # the step's one host sync
                if not math.isfinite(loss_value):
                    raise _nonfinite_loss(model, loss_value, epoch, step + 1, saved)
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for _, p in trainable_parameters(model)], cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sum += loss_value * len(idx)
                bar.update(len(idx))
                bar.set_postfix(loss=f"{loss_sum / max(bar.n, 1):.4f}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and b + 1 < len(batches):
                    checkpoint(epoch, b + 1, loss_sum)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        metrics, eval_loss, _ = evaluate(model, eval_features, spec, collator, batch_size=cfg.eval_batch_size,
                                         device=device, cache=eval_cache)
        history.append(EpochRecord(epoch, loss_sum / len(train_features), train_seconds,
                                   time.perf_counter() - start, metrics, eval_loss))
        if metrics[metric] > best_value:
            best_value, best_state, best_epoch = metrics[metric], _trainable_state(model), epoch
        for cb in callbacks:
            cb.on_epoch_end(epoch, model)
        checkpoint(epoch + 1, 0, 0.0)
    assert best_state is not None
    with torch.no_grad():
        for n, p in trainable_parameters(model):
            p.copy_(best_state[n])
    model.eval()
    return TrainResult(history, best_epoch, history[best_epoch - 1].metrics, metric, trainable, cache_info,
                       peak_memory_mb(device), {cb.name: cb.report() for cb in callbacks}, extensions)


# --------------------------------------------------------------------------------------------------
# Checkpoints: trained parameters only
# --------------------------------------------------------------------------------------------------

_WEIGHTS, _PLAN, _META = "trained.safetensors", "plan.json", "base.json"


def save_trained(model: nn.Module, plan: Plan, out_dir: str | Path, *, base_model: str, num_labels: int,
                 seed: int, extra: dict[str, Any] | None = None) -> Path:
    """Write the trained parameters (safetensors), the plan and what is needed to rebuild the base model."""
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().contiguous().cpu() for n, p in trainable_parameters(model)}
    blob = save(state, metadata={"format": "pt", "fastsel": "trained-parameters"})
    atomic_write(out / _WEIGHTS, lambda f: f.write(blob), binary=True)
    plan.to_json(out / _PLAN)
    meta = {"base_model": base_model, "num_labels": num_labels, "seed": seed, **(extra or {})}
    atomic_write_json(out / _META, meta)
    return out


def load_trained(run_dir: str | Path, *, device: str = "cpu", base_model: str | None = None):
    """(model, tokenizer, plan): the base model with the plan applied and the trained parameters loaded."""
    from safetensors.torch import load_file

    run = Path(run_dir)
    for name in (_WEIGHTS, _PLAN, _META):
        if not (run / name).is_file():
            raise FileNotFoundError(f"fastsel: {run} is not a fastsel run directory: {name} is missing")
    meta = json.loads((run / _META).read_text())
    plan = Plan.from_json(run / _PLAN)
    model, tokenizer, _ = load_model(base_model or meta["base_model"], num_labels=meta["num_labels"], seed=meta["seed"])
    apply_plan(model, plan)
    state = load_file(str(run / _WEIGHTS))
    expected = {n for n, _ in trainable_parameters(model)}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"fastsel: saved parameters do not match the plan: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), tokenizer, plan


# --------------------------------------------------------------------------------------------------
# Rank stability of the Fisher ranking during training
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _all_blocks_trainable(model: nn.Module) -> Iterator[None]:
    """Every original block/embedding/head parameter requires grad (LoRA/adapter modules do not); restored after."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(not is_added_parameter(n))
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


class RankStability:
    """Fisher layer ranking at ``epochs`` (0 = before training) on fixed ``features``; deviation vs epoch 0.

    report(): {"epochs": {e: {"ranking", "scores", "rank_deviation" (per layer |rank_e - rank_0|),
    "mean_deviation", "max_deviation", "kendall_tau"}}}.
    """

    def __init__(self, features: Sequence[dict], tokenizer: Any, epochs: Sequence[int] = (0,), *, batch_size: int = 16,
                 mode: str = "empirical", seed: int = 0, device: str = "cpu", progress: bool = False,
                 name: str = "rank_stability") -> None:
        self.name = name  # the key of this callback's report in results.json
        if 0 not in epochs:
            epochs = (0, *epochs)
        self.features, self.epochs = list(features), sorted(set(int(e) for e in epochs))
        self.collator, self.batch_size, self.mode, self.seed = PadCollator(tokenizer), batch_size, mode, seed
        self.device, self.progress = device, progress
        self.results: dict[int, dict[str, Any]] = {}

    def _scores(self, model: nn.Module) -> list[float]:
        batches = (self.collator(self.features[i : i + self.batch_size]) for i in range(0, len(self.features), self.batch_size))
        with _all_blocks_trainable(model):
            scores, _ = fisher_layer_scores(model, batches, mode=self.mode, seed=self.seed, device=self.device,
                                            total=len(self.features), progress=self.progress)
        return [s.score for s in scores.layers]

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        from scipy.stats import kendalltau

        if epoch not in self.epochs:
            return
        values = self._scores(model)
        ranking = sorted(range(len(values)), key=lambda l: (-values[l], l))
        rank = [0] * len(values)
        for r, l in enumerate(ranking):
            rank[l] = r + 1
        entry: dict[str, Any] = {"ranking": ranking, "scores": values, "ranks": rank}
        if 0 in self.results:
            rank0 = self.results[0]["ranks"]
            dev = [abs(a - b) for a, b in zip(rank, rank0)]
            tau = kendalltau(rank0, rank).statistic if len(rank) > 1 else 1.0
            entry.update(rank_deviation=dev, mean_deviation=float(np.mean(dev)), max_deviation=int(max(dev)),
                         kendall_tau=float(tau))
        self.results[epoch] = entry

    def report(self) -> dict[str, Any]:
        return {"epochs": {str(e): r for e, r in sorted(self.results.items())}}


def trainer_callback(*callbacks: EpochCallback):
    """A ``transformers.TrainerCallback`` that runs fastsel epoch callbacks (epoch 0 at train begin)."""
    from transformers import TrainerCallback

    class _FastselCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            for cb in callbacks:
                cb.on_epoch_end(0, model)

        def on_epoch_end(self, args, state, control, model=None, **kw):
            for cb in callbacks:
                cb.on_epoch_end(int(round(state.epoch)), model)

    return _FastselCallback()


# --------------------------------------------------------------------------------------------------
# fastsel finetune
# --------------------------------------------------------------------------------------------------


@dataclass
class FinetuneJob:
    """Everything ``fastsel finetune`` needs; see ``fastsel finetune --help``."""

    model: str
    task: str
    out: str
    data_dir: str | None = None
    plan_path: str | None = None
    strategy: str | None = None
    scores_path: str | None = None
    tuner: str = "full"
    lora_r: int = 8
    lora_alpha: float | None = None  # None: 2 * lora_r
    lora_dropout: float = 0.0
    adapter_size: int = 256
    score_examples: int = 512
    fisher_mode: str = "empirical"
    epochs: int = 3
    lr: float = 2e-5
    batch_size: int = 16
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_length: int = 128
    train_examples: int | None = None
    eval_examples: int | None = None
    seed: int = 0
    device: str = "cpu"
    cache_prefix: str = "auto"
    rank_epochs: tuple[int, ...] = ()
    rank_examples: int = 256
    rank_split: str = "train"  # examples of the rank-stability passes: train, validation or both
    head: str = "fresh"  # fresh | probe | warmup:STEPS | a checkpoint folder (fastsel.pipeline.heads)
    probe_examples: int = 1000  # training examples (after the scored ones) that --head probe / warmup fits on
    # custom data (task "custom"): a CSV/TSV/JSONL training file with named columns, as fastsel score reads it;
    # evaluation on eval_file, or on a seeded EVAL_SHARE of data_file held out when there is none
    data_file: str | None = None
    eval_file: str | None = None
    text_fields: tuple[str, ...] = ()
    label_field: str = "label"
    regression: bool = False
    progress: bool = True
    checkpoint_every: int = 0  # optimizer steps between training checkpoints (0: every epoch end)
    resume: bool = False  # continue from <out>/train-state.pt
    keep_checkpoints: bool = False  # keep <out>/train-state.pt once the run has finished (default: removed)


TRAIN_STATE = "train-state.pt"
EVAL_SHARE = 0.1  # custom data without an eval file: this share of the file (at least one example) is held out
RANK_SPLITS = {"train": ("train",), "validation": ("validation",), "both": ("train", "validation")}
RANK_CALLBACK_NAMES = {"train": "rank_stability", "validation": "rank_stability_heldout"}


def job_examples(job: FinetuneJob) -> tuple[TaskSpec, Examples, Examples, str]:
    """The task, training and evaluation examples of a job, and where the evaluation ones come from. A GLUE/SuperGLUE
    task: its train and validation splits. Task "custom": ``data_file`` for training and ``eval_file`` (its labels
    mapped onto the training file's classes) for evaluation, or, without one, a seeded ``EVAL_SHARE`` of
    ``data_file`` held out (never trained on). Then the seeded subsets of ``train_examples`` (class-balanced) and
    ``eval_examples``."""
    if job.task != "custom":
        given = [flag for flag, value in (("--data-file", job.data_file), ("--eval-file", job.eval_file),
                                           ("--text-fields", job.text_fields), ("--regression", job.regression),
                                           ("--label-field", job.label_field != "label")) if value]
        if given:
            raise ValueError(f"fastsel: {given[0]} applies only to --task custom (a CSV/TSV/JSONL --data-file); --task "
                             f"{job.task} would ignore it: add --task custom, or leave {given[0]} out")
        spec = get_task(job.task)
        train_ex = load_examples(spec, job.data_dir, "train")
        eval_ex = load_examples(spec, job.data_dir, "validation")
        source = f"the {spec.name} validation split"
    else:
        if not job.data_file or not job.text_fields:
            raise ValueError("fastsel: --task custom needs --data-file (the training file) and --text-fields (its one "
                             "or two text columns)")
        if job.eval_file and Path(job.eval_file).expanduser().resolve() == Path(job.data_file).expanduser().resolve():
            raise ValueError(f"fastsel: --eval-file {job.eval_file} is the --data-file: the model would be evaluated on "
                             "its training examples; give a file of other examples, or leave --eval-file out (then "
                             f"{EVAL_SHARE:.0%} of --data-file is held out)")
        read = dict(text_fields=job.text_fields, label_field=job.label_field, regression=job.regression)
        full = load_custom_examples(job.data_file, **read)
        spec = full.task
        if job.eval_file:
            eval_ex = load_custom_examples(job.eval_file, **read,
                                           label_names=None if spec.is_regression else spec.label_names)
            train_ex, source = full, str(Path(job.eval_file).expanduser().resolve())
        else:
            if len(full) < 2:
                raise ValueError(f"fastsel: --data-file {job.data_file} has {len(full)} example; holding some out for "
                                 "evaluation needs at least 2 (or give --eval-file)")
            order = np.random.default_rng([job.seed, 0x4556414C]).permutation(len(full))  # own stream: "EVAL"
            held = max(1, int(round(EVAL_SHARE * len(full))))
            eval_ex, train_ex = full.subset(sorted(order[:held])), full.subset(sorted(order[held:]))
            source = (f"{held} of the {len(full)} examples of {Path(job.data_file).expanduser().resolve()} held out "
                      f"({EVAL_SHARE:.0%}, seed {job.seed}; not trained on)")
    train_ex = subsample(train_ex, job.train_examples, job.seed,
                         balanced=job.train_examples is not None and not spec.is_regression)
    eval_ex = subsample(eval_ex, job.eval_examples, job.seed, balanced=False)
    return spec, train_ex, eval_ex, source


def _score_for(job: FinetuneJob, metric: str, model, tokenizer, layer_map, train_features, out: Path):
    """Scores for a score-based strategy: Fisher on the loaded model, other metrics through fastsel.pipeline."""
    if job.scores_path:
        return LayerScores.read(job.scores_path)
    if metric in ("fisher", "scores"):
        feats = train_features[: job.score_examples]
        scores, _ = fisher_layer_scores(model, make_dataloader(feats, tokenizer, 16), mode=job.fisher_mode, seed=job.seed,
                                        total=len(feats), progress=job.progress, layer_map=layer_map,
                                        model_name=job.model, task=job.task, split="train")
    else:
        if metric not in METRICS:
            raise ValueError(f"fastsel: strategy needs {metric!r} scores but no {metric!r} metric is registered "
                             f"(known: {sorted(METRICS)}); pass --scores with a {metric} scores.json")
        if job.task == "custom" and not job.eval_file:
            # the pass reads the whole --data-file, whose held-out share must not choose the layers
            raise ValueError(f"fastsel: a strategy scored by {metric} on --task custom needs --eval-file (then all of "
                             "--data-file is training data and may be scored), or --scores from fastsel score on the "
                             "training examples")
        scores = run_scoring(ScoreConfig(metric=metric, model=job.model, task=job.task, data_dir=job.data_dir,
                                         num_examples=job.score_examples, balanced=not job.regression, seed=job.seed,
                                         max_length=job.max_length, device=job.device, data_file=job.data_file,
                                         text_fields=job.text_fields, label_field=job.label_field,
                                         regression=job.regression), progress=job.progress)
    scores.to_json(out / "scores.json")
    return scores


def _plot_curves(result: TrainResult, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in result.history]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot(epochs, [r.train_loss for r in result.history], marker="o", label="train loss", color="#1f4e79")
    if all(r.eval_loss is not None for r in result.history):
        ax.plot(epochs, [r.eval_loss for r in result.history], marker="s", label="eval loss", color="#9dc3e6")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_xticks(epochs)
    ax2 = ax.twinx()
    ax2.plot(epochs, [r.metrics[result.main_metric] for r in result.history], marker="^", color="#c55a11",
             label=f"eval {result.main_metric}")
    ax2.set_ylabel(f"eval {result.main_metric}", color="#c55a11")
    ax2.axvline(result.best_epoch, color="#c55a11", ls=":", lw=1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [l.get_label() for l in lines], fontsize=8, loc="center right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        atomic_savefig(fig, path)  # a temporary file renamed over path: never a half-written image
    finally:
        plt.close(fig)


def run_finetune(job: FinetuneJob) -> dict[str, Any]:
    """Load data and model, build or read the plan (scoring first if needed), train, save; returns results."""
    parse_head(job.head)  # a bad --head fails before any data or model is loaded
    if job.probe_examples < 10:
        raise ValueError(f"fastsel: --probe-examples must be >= 10, got {job.probe_examples}")
    if job.rank_split not in RANK_SPLITS:
        raise ValueError(f"fastsel: --rank-split must be one of {sorted(RANK_SPLITS)}, got {job.rank_split!r}")
    for flag, value in (("--train-examples", job.train_examples), ("--eval-examples", job.eval_examples)):
        if value is not None and value < 1:
            raise ValueError(f"fastsel: {flag} must be >= 1 (leave it out for all the examples), got {value}")
    out = Path(job.out)
    if job.resume and not (out / TRAIN_STATE).exists() and (out / "results.json").is_file():
        raise ValueError(f"fastsel: --resume: the run in {job.out} has finished and its training state was removed "
                         f"({TRAIN_STATE}; kept only with --keep-checkpoints), so it cannot go on; train again without "
                         "--resume, with --keep-checkpoints to be able to extend the run later with more --epochs")
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(epochs=job.epochs, lr=job.lr, batch_size=job.batch_size, warmup_ratio=job.warmup_ratio,
                      weight_decay=job.weight_decay, seed=job.seed, device=job.device, cache_prefix=job.cache_prefix,
                      progress=job.progress, checkpoint=str(out / TRAIN_STATE), checkpoint_every=job.checkpoint_every,
                      resume=job.resume)
    spec, train_ex, eval_ex, eval_source = job_examples(job)
    num_labels = 1 if spec.is_regression else spec.num_labels
    model, tokenizer, layer_map = load_model(job.model, num_labels=num_labels, seed=job.seed, device=job.device)
    job.max_length, limit = clamp_max_length(job.max_length, model.config, job.model)
    train_features = tokenize_examples(train_ex, tokenizer, job.max_length)
    eval_features = tokenize_examples(eval_ex, tokenizer, job.max_length)
    # The head every strategy starts from (and scores with): fitted on training examples that are not scored.
    pool = train_features[job.score_examples:][: job.probe_examples]
    head = prepare_head(job.head, HeadRequest(model, tokenizer, layer_map, spec, lambda: list(pool), seed=job.seed,
                                              batch_size=job.batch_size, device=job.device, progress=job.progress))
    if head.fits_labels and job.progress:
        print(f"fastsel: every strategy starts from the {head.info['kind']} head", file=sys.stderr)

    score_seconds = 0.0
    if job.plan_path:
        plan = Plan.from_json(job.plan_path)
    else:
        assert job.strategy is not None
        strategy, _ = find_strategy(job.strategy)
        scores = None
        if strategy.needs is not None:
            start = time.perf_counter()
            scores = _score_for(job, strategy.needs, model, tokenizer, layer_map, train_features, out)
            score_seconds = time.perf_counter() - start
        plan = build_plan(job.strategy, layer_map.num_layers, scores=scores, tuner=job.tuner, task=spec.name,
                          lora=LoraSpec(r=job.lora_r, alpha=2 * job.lora_r if job.lora_alpha is None else job.lora_alpha,
                                        dropout=job.lora_dropout),
                          adapter_size=job.adapter_size)
    plan = with_counts(plan, model.config)  # on the meta device: no copy of the weights
    apply_plan(model, plan, layer_map)
    print(f"fastsel: {tuning_summary(plan)}", file=sys.stderr)

    callbacks: list[EpochCallback] = []
    if job.rank_epochs:
        # Training examples are the ones the model fits, so their gradients shrink as it trains; the held-out
        # (validation) passes measure the ranking on data the model never saw.
        for split in RANK_SPLITS[job.rank_split]:
            feats = train_features if split == "train" else eval_features
            callbacks.append(RankStability(feats[: job.rank_examples], tokenizer, job.rank_epochs, seed=job.seed,
                                           device=job.device, progress=job.progress, name=RANK_CALLBACK_NAMES[split]))
    result = train_model(model, plan, train_features, eval_features, spec, tokenizer, cfg, callbacks=callbacks)
    save_trained(model, plan, out, base_model=job.model, num_labels=num_labels, seed=job.seed)
    export = export_trained(model, plan, out / EXPORT_DIR, base_model=job.model, num_labels=num_labels)
    results = {
        "job": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(job).items()},
        "task": spec.name,
        "strategy": plan.strategy,
        "plan_table": plan.table(),
        "num_train": len(train_features),
        "num_eval": len(eval_features),
        "eval_source": eval_source,
        "score_seconds": score_seconds,
        "head": {k: v for k, v in head.info.items() if k != "parameters"},
        "max_length_limit": limit,
        "export": {"dir": EXPORT_DIR, "peft": export["peft"], "note": export["note"]},
        **result.to_dict(),
    }
    atomic_write_json(out / "results.json", results)  # strict JSON: no NaN/Infinity
    _plot_curves(result, out / "curve.png", f"{plan.strategy} on {spec.name} ({layer_map.model_type}, "
                                             f"{result.trainable_params:,} trainable)")
    if not job.keep_checkpoints:  # the trained model and results.json are written: the training state is not needed
        (out / TRAIN_STATE).unlink(missing_ok=True)
    return results
