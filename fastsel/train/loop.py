"""The training loop (:func:`train_model`): AdamW over the trainable parameters only, linear decay after a warmup
ratio, gradient clipping, evaluation after every epoch with the task's official metrics, the best epoch kept (its
trainable parameters restored at the end), seeded shuffling and dropout, the training state checkpointed
(:mod:`fastsel.train.train_state`) and resumed.

When the embeddings and blocks 0..c-1 are frozen and the data is fixed, their output (B, T, H) is computed once
(:class:`fastsel.capture.prefix_cache.PrefixCache`, eval mode, so without dropout) and blocks c.. train on the
cache: exact whenever the frozen part would run without dropout anyway.
"""
from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastsel.capture.prefix_cache import PrefixCache, index_batches
from fastsel.data.features import PadCollator
from fastsel.data.specs import TaskSpec, get_task
from fastsel.data.task_metrics import main_metric, predictions_from_logits, task_metrics
from fastsel.hf.io import eval_mode, model_inputs
from fastsel.hf.layer_map import map_layers
from fastsel.pipeline.checkpoint import fingerprint
from fastsel.pipeline.checks import NonFiniteError, first_nonfinite_parameter
from fastsel.plans.plan import Plan, PlanError
from fastsel.train.config import TrainConfig
from fastsel.train.train_state import (
    check_extension,
    load_train_checkpoint,
    rng_state,
    save_train_checkpoint,
    set_rng_state,
    train_settings,
)
from fastsel.tuners.apply import trainable_parameters
from fastsel.utils.progress import progress_bar

__all__ = ["EpochRecord", "TrainResult", "EpochCallback", "peak_memory_mb", "make_optimizer", "cacheable_prefix",
           "evaluate", "train_model"]


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
    if cfg.resume and not cfg.state_file:  # (fastsel finetune sets it: OUT/train-state.pt)
        raise ValueError("fastsel: TrainConfig(resume=True) needs a state_file to resume from")
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
    settings = train_settings(cfg, plan, train_features, eval_features) if cfg.state_file else None
    state = load_train_checkpoint(cfg.state_file, settings) if cfg.state_file and cfg.resume else None  # type: ignore[arg-type]
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
        extension = check_extension(state, cfg, steps_per_epoch)
        if extension is not None:
            extensions.append(extension)
        # the schedule of cfg.epochs from the saved step on (the same value when the epochs are unchanged)
        for group, base, lam in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * lam(scheduler.last_epoch)
        history = [EpochRecord(**r) for r in state["history"]]
        best_value, best_epoch, best_state = state["best_value"], state["best_epoch"], state["best_state"]
        first_epoch, skip, step, resumed_loss = state["epoch"], state["batch"], state["step"], state["loss_sum"]
        set_rng_state(state["rng"], device)
        saved = f"step {step}"
        print(f"fastsel: resuming training at epoch {first_epoch}, batch {skip} (step {step}) from {cfg.state_file}",
              file=sys.stderr)
        if extension is not None:
            print(f"fastsel: {extension['note']}", file=sys.stderr)
        del state
    else:
        if cfg.resume:
            print(f"fastsel: no training checkpoint at {cfg.state_file}; starting from the beginning", file=sys.stderr)
        for cb in callbacks:
            cb.on_epoch_end(0, model)

    def checkpoint(epoch: int, batch: int, loss_sum: float) -> None:
        nonlocal saved
        if not cfg.state_file:
            return
        save_train_checkpoint(cfg.state_file, {
            "settings": settings, "fingerprint": fingerprint(settings),
            "params": {n: p.detach().cpu().clone() for n, p in trainable_parameters(model)},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(device),
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
                if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and b + 1 < len(batches):
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
