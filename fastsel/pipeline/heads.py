"""Where the classification head of a Fisher scoring run comes from (``--head``): one registry of head sources.

With a freshly initialised head (``fresh``, the paper's setting) the Fisher ranking hardly depends on the labels:
for two classes an example's gradient is ±½ u^T dφ/dθ for a random u, and the gold label only flips a sign that
squaring removes (docs/task_aware.md). The other sources give the score a head that knows the task:

- ``auto`` (the default): ``probe`` when at least :data:`AUTO_MIN_EXAMPLES` training examples are not scored,
  else ``fresh``, said in one line and recorded (``requested: auto``, ``why_fresh``). The pre-registered study of
  docs/task_aware.md made the probe the default: its ranking depends on the task, and the blocks it chooses train
  no worse than the fresh head's;
- ``fresh``: the seeded random head that :func:`fastsel.hf.loading.load_model` initialised;
- ``probe``: the model's own head (every parameter of the head group, plus any parameter the checkpoint lacked,
  such as a pooler it did not ship) fitted with the backbone frozen, on cached backbone outputs of up to
  ``probe_examples`` training examples that are not scored; L2-regularised, seeded, early-stopped on a held-out
  fifth. Heads with a hidden layer (RoBERTa's dense + out_proj, DeBERTa's pooler) are fitted as they are, through
  the model's own forward and loss (cross-entropy, or squared error for a regression head: a least-squares fit);
- ``warmup:STEPS``: a short full fine-tuning of STEPS optimizer steps (registered by :mod:`fastsel.train.heads`);
- a path: the head of a checkpoint folder (``--save-head`` writes one).

Each source returns a :class:`PreparedHead`: what ``scores.json`` records under ``head``, and the head the
label-dependence check scores permuted labels with (a probe fitted on permuted labels; the same head otherwise).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastsel.capture.prefix_cache import PrefixCache, index_batches
from fastsel.data.task_metrics import main_metric, predictions_from_logits, task_metrics
from fastsel.data.examples import Examples
from fastsel.data.features import PadCollator, tokenize_examples
from fastsel.data.readers import examples_for
from fastsel.data.specs import TaskSpec
from fastsel.hf.io import eval_mode, model_inputs
from fastsel.hf.layer_map import HEAD, LayerMap
from fastsel.hf.loading import new_parameter_names, quiet_transformers

if TYPE_CHECKING:
    from fastsel.pipeline.config import ScoreConfig

__all__ = ["HeadSource", "HeadRequest", "PreparedHead", "HEAD_SOURCES", "register_head_source", "parse_head",
           "AUTO_MIN_EXAMPLES", "DEFAULT_HEAD", "HEAD_METAVAR", "fits_on_pool", "prepare_head", "head_parameter_names",
           "fit_head", "save_head", "probe_pool", "setup_head"]


@dataclass
class HeadRequest:
    """What a head source gets.

    ``model`` carries the freshly initialised head; ``pool()`` tokenises (once, lazily) the training examples a
    source may fit on, none of them among the scored ones; ``argument`` is the text after ``kind:`` (warm-up
    steps) or the checkpoint path.
    """

    model: nn.Module
    tokenizer: Any
    layer_map: LayerMap
    task: TaskSpec
    pool: Callable[[], list[dict]]
    argument: str | None = None
    seed: int = 0
    batch_size: int = 16
    device: torch.device | str = "cpu"
    progress: bool = False
    pool_limit: int | None = None  # the most examples pool() returns (--probe-examples): auto needs no more than that


class PreparedHead:
    """The head a run scores with: ``info`` (scores.json ``head``) and ``permuted_labels(seed)``, a context in which
    the model holds the head that goes with labels permuted by ``seed`` (the same head for sources that fit
    nothing; restored on exit). ``permuted_info``: what the last permuted-label fit recorded."""

    def __init__(self, info: dict[str, Any], permuted: Callable[[int], contextlib.AbstractContextManager] | None = None,
                 fits_labels: bool = False) -> None:
        self.info = info
        self._permuted = permuted
        self.fits_labels = fits_labels  # True when the head was fitted to the labels (probe, warm-up)
        self.permuted_info: dict[str, Any] | None = None

    def permuted_labels(self, seed: int) -> contextlib.AbstractContextManager:
        return self._permuted(seed) if self._permuted is not None else contextlib.nullcontext()


@dataclass(frozen=True)
class HeadSource:
    name: str
    prepare: Callable[[HeadRequest], PreparedHead]
    help: str
    needs_pool: bool = False  # fits on training examples (the pool is loaded and tokenised only then)


HEAD_SOURCES: dict[str, HeadSource] = {}
DEFAULT_HEAD = "auto"
HEAD_METAVAR = "auto|fresh|probe|warmup:STEPS|DIR"
AUTO_MIN_EXAMPLES = 100  # --head auto fits a probe from this many training examples that are not scored


def register_head_source(source: HeadSource) -> HeadSource:
    if source.name in HEAD_SOURCES:
        raise ValueError(f"fastsel: head source {source.name!r} registered twice")
    HEAD_SOURCES[source.name] = source
    return source


def parse_head(spec: str) -> tuple[str, str | None]:
    """``auto`` / ``fresh`` / ``probe`` / ``warmup:STEPS`` / a checkpoint folder -> (kind, argument); ValueError (one
    line)."""
    spec = str(spec).strip()
    if spec in ("auto", "fresh", "probe"):
        return spec, None
    if spec.startswith("warmup:") or spec == "warmup":
        steps = spec.partition(":")[2]
        if not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"fastsel: --head {spec!r}: give the warm-up steps as warmup:STEPS, STEPS >= 1 (e.g. warmup:200)")
        return "warmup", steps
    path = Path(spec).expanduser()
    if path.is_dir():
        return "path", str(path.resolve())
    if path.exists():
        raise ValueError(f"fastsel: --head {spec!r} is a file; give a checkpoint folder (as written by --save-head)")
    raise ValueError(f"fastsel: --head {spec!r} is neither auto, fresh, probe, warmup:STEPS nor an existing checkpoint "
                     "folder")


def fits_on_pool(spec: str) -> bool:
    """Whether the head source ``spec`` names fits on training examples (so ``--probe-examples`` applies to it)."""
    kind, _ = parse_head(spec)
    source = HEAD_SOURCES.get(kind)
    return source is not None and source.needs_pool


def prepare_head(spec: str, request: HeadRequest) -> PreparedHead:
    """Put the head named by ``spec`` into ``request.model``; what was done is in the returned ``info``."""
    kind, argument = parse_head(spec)
    if kind not in HEAD_SOURCES:
        raise ValueError(f"fastsel: --head {kind} is registered by fastsel.train (import fastsel.train first); "
                         f"known here: {sorted(HEAD_SOURCES)}")
    return HEAD_SOURCES[kind].prepare(replace(request, argument=argument))


def head_parameter_names(model: nn.Module, layer_map: LayerMap) -> list[str]:
    """The parameters a fitted head trains: the head group, and whatever the checkpoint did not hold (in the
    model's parameter order)."""
    new = new_parameter_names(model)
    return [n for n, _ in model.named_parameters() if layer_map.group_of(n) == HEAD or n in new]


def _state(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def _load_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


@contextlib.contextmanager
def _swapped(model: nn.Module, state: Mapping[str, Tensor]) -> Iterator[None]:
    saved = _state(model, list(state))
    _load_state(model, state)
    try:
        yield
    finally:
        _load_state(model, saved)


# --------------------------------------------------------------------------------------------------
# fresh and a checkpoint's head
# --------------------------------------------------------------------------------------------------


def _fresh(req: HeadRequest) -> PreparedHead:
    return PreparedHead({"kind": "fresh", "seed": req.seed, "fitted": False})


def _from_checkpoint(req: HeadRequest) -> PreparedHead:
    from transformers import AutoModelForSequenceClassification

    path = str(req.argument)
    names = head_parameter_names(req.model, req.layer_map)
    try:
        with quiet_transformers():
            source = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"fastsel: --head {path}: not a loadable checkpoint folder ({str(exc).splitlines()[0]})") from None
    theirs = dict(source.named_parameters())
    mine = dict(req.model.named_parameters())
    missing = [n for n in names if n not in theirs]
    if missing:
        raise ValueError(f"fastsel: --head {path}: the checkpoint has no {missing[0]} (not a checkpoint of this model "
                         f"and head; {len(missing)} head parameters missing)")
    for n in names:
        if theirs[n].shape != mine[n].shape:
            raise ValueError(f"fastsel: --head {path}: {n} has shape {tuple(theirs[n].shape)} there and "
                             f"{tuple(mine[n].shape)} here (another number of labels?)")
    _load_state(req.model, {n: theirs[n].detach().to(mine[n].dtype) for n in names})
    return PreparedHead({"kind": "path", "path": path, "fitted": True, "parameters": names})


# --------------------------------------------------------------------------------------------------
# probe: the model's own head fitted on cached outputs of the frozen backbone
# --------------------------------------------------------------------------------------------------

PROBE_L2 = 1e-3  # weight of sum W^2 over the head's weight matrices (biases free), per mean example loss
PROBE_HOLDOUT = 0.2  # share of the probe examples held out for early stopping
PROBE_LR = 1e-2  # Adam; a linear head on ~unit-scale features converges in a few epochs at this rate
PROBE_MAX_EPOCHS = 60
PROBE_PATIENCE = 3  # epochs without a better held-out loss before stopping
PROBE_BATCH = 32


def _holdout_split(n: int, seed: int) -> tuple[list[int], list[int]]:
    order = np.random.default_rng([seed, 0x9E0BE]).permutation(n).tolist()
    k = max(1, int(round(PROBE_HOLDOUT * n)))
    if n - k < 1:
        raise ValueError(f"fastsel: {n} probe example(s) are too few to fit a head and hold some out; raise --probe-examples")
    return sorted(order[k:]), sorted(order[:k])


def _mean_loss(model: nn.Module, cache: PrefixCache, features: Sequence[dict], rows: Sequence[int],
               collator: PadCollator, device: torch.device) -> tuple[float, Tensor]:
    """(mean loss, logits (N, C)) of ``model`` on the cached ``rows``."""
    loss_sum, logits = 0.0, []
    with torch.no_grad():
        for idx in index_batches(len(rows), 256, shuffle=False, seed=0):
            chosen = [rows[i] for i in idx]
            batch = {k: v.to(device) for k, v in collator([features[i] for i in chosen]).items()}
            cache.set_batch(chosen)
            out = model(**model_inputs(batch, labels=True))
            loss_sum += float(out.loss) * len(chosen)
            logits.append(out.logits.float().cpu())
    return loss_sum / len(rows), torch.cat(logits)


def _baseline(task: TaskSpec, fit_labels: np.ndarray, held_labels: np.ndarray) -> dict[str, Any]:
    """The majority-class predictor (classification) or the mean predictor (regression) on the held-out part."""
    if task.is_regression:
        mean = float(fit_labels.mean())
        return {"predictor": "mean", "mse": float(np.mean((held_labels - mean) ** 2))}
    values, counts = np.unique(fit_labels, return_counts=True)
    majority = int(values[int(np.argmax(counts))])
    pred = np.full_like(held_labels, majority)
    metrics = {k: v for k, v in task_metrics(task, pred, held_labels).items() if math.isfinite(v)}
    return {"predictor": "majority", "class": majority, **metrics}


def fit_head(model: nn.Module, layer_map: LayerMap, tokenizer: Any, features: Sequence[dict], task: TaskSpec, *,
             seed: int = 0, cache: PrefixCache | None = None, labels: Sequence[float] | None = None,
             device: torch.device | str = "cpu", progress: bool = False) -> tuple[dict[str, Any], PrefixCache]:
    """Fit the model's head (:func:`head_parameter_names`) on ``features`` with every block frozen and cached.

    features: tokenised examples (``labels`` overridden by ``labels`` (N,) when given: the permuted-label probe).
    Adam on the model's own loss + PROBE_L2 * sum W^2 (weights only), batches of PROBE_BATCH in a seeded order,
    eval mode (no dropout), early stopping on the held-out loss (PROBE_PATIENCE epochs), the best epoch restored.
    Returns (info, the cache, reusable for another fit on the same features).
    """
    device = torch.device(device)
    if labels is not None:
        features = [{**f, "labels": lab} for f, lab in zip(features, labels)]
    fit_rows, held_rows = _holdout_split(len(features), seed)
    collator = PadCollator(tokenizer)
    if cache is None:
        cache = PrefixCache(model, layer_map, layer_map.num_layers, features, collator, 64, device, progress, "probe features")
    names = head_parameter_names(model, layer_map)
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    fitted = [params[n] for n in names]
    weights = [params[n] for n in names if params[n].ndim >= 2]
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(fitted, lr=PROBE_LR)
    best_loss, best_state, best_epoch, since = math.inf, _state(model, names), 0, 0
    epochs = 0
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
        with eval_mode(model), cache.activate(model):
            best_loss, _ = _mean_loss(model, cache, features, held_rows, collator, device)
            for epoch in range(1, PROBE_MAX_EPOCHS + 1):
                epochs = epoch
                order = torch.randperm(len(fit_rows), generator=gen).tolist()
                for start in range(0, len(order), PROBE_BATCH):
                    chosen = [fit_rows[i] for i in order[start:start + PROBE_BATCH]]
                    batch = {k: v.to(device) for k, v in collator([features[i] for i in chosen]).items()}
                    cache.set_batch(chosen)
                    loss = model(**model_inputs(batch, labels=True)).loss
                    loss = loss + PROBE_L2 * sum(w.square().sum() for w in weights)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                held, _ = _mean_loss(model, cache, features, held_rows, collator, device)
                if held < best_loss - 1e-6:
                    best_loss, best_state, best_epoch, since = held, _state(model, names), epoch, 0
                else:
                    since += 1
                    if since >= PROBE_PATIENCE:
                        break
            _load_state(model, best_state)
            held_loss, held_logits = _mean_loss(model, cache, features, held_rows, collator, device)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        optimizer.zero_grad(set_to_none=True)
    gold = np.asarray([features[i]["labels"] for i in held_rows])
    fit_gold = np.asarray([features[i]["labels"] for i in fit_rows])
    pred = predictions_from_logits(held_logits.numpy(), task.is_regression)
    metrics = {k: v for k, v in task_metrics(task, pred, gold).items() if math.isfinite(v)}
    info = {"examples": len(features), "fit_examples": len(fit_rows), "heldout_examples": len(held_rows),
            "epochs": epochs, "best_epoch": best_epoch, "heldout_loss": held_loss, "heldout_metrics": metrics,
            "main_metric": main_metric(task), "baseline": _baseline(task, fit_gold, gold), "l2": PROBE_L2,
            "parameters": names}
    return info, cache


def _probe(req: HeadRequest) -> PreparedHead:
    features = req.pool()
    if len(features) < 10:
        raise ValueError(f"fastsel: only {len(features)} training examples of {req.task.name} are not scored, too few to "
                         "fit a head; score fewer examples (--num-examples, finetune: --score-examples), give more "
                         "training examples, or use --head fresh")
    names = head_parameter_names(req.model, req.layer_map)
    initial = _state(req.model, names)  # the fresh head: both probes start from it
    info, cache = fit_head(req.model, req.layer_map, req.tokenizer, features, req.task, seed=req.seed,
                           device=req.device, progress=req.progress)
    main = info["main_metric"]
    if req.progress:
        got = info["heldout_metrics"].get(main)
        base = info["baseline"].get(main, info["baseline"].get("mse"))
        print(f"fastsel: probe head fitted on {info['fit_examples']} examples ({info['best_epoch']} epochs): held-out "
              f"{main} {got if got is None else round(got, 4)} (baseline {base if base is None else round(base, 4)})",
              file=sys.stderr)

    @contextlib.contextmanager
    def permuted(seed: int) -> Iterator[None]:
        order = np.random.default_rng([seed, 0x9E3A]).permutation(len(features))
        labels = [features[int(j)]["labels"] for j in order]
        with _swapped(req.model, initial):  # the fitted head comes back on exit
            head.permuted_info, _ = fit_head(req.model, req.layer_map, req.tokenizer, features, req.task, seed=req.seed,
                                             cache=cache, labels=labels, device=req.device)
            yield

    head = PreparedHead({"kind": "probe", "seed": req.seed, "fitted": True, **info}, permuted, fits_labels=True)
    return head


def _auto(req: HeadRequest) -> PreparedHead:
    """probe when the pool holds AUTO_MIN_EXAMPLES examples or more, else fresh (said on stderr and recorded)."""
    available = len(req.pool())
    if available >= min(AUTO_MIN_EXAMPLES, req.pool_limit or AUTO_MIN_EXAMPLES):
        head = _probe(req)
        head.info["requested"] = "auto"
        return head
    why = f"only {available} training examples are not scored (auto fits a probe head from {AUTO_MIN_EXAMPLES})"
    print(f"fastsel: --head auto: {why}; scoring with the fresh head, whose ranking reflects the model more than the "
          "task (--head fresh chooses it outright)", file=sys.stderr)
    head = _fresh(req)
    head.info.update(requested="auto", why_fresh=why)
    return head


register_head_source(HeadSource("auto", _auto, f"probe when at least {AUTO_MIN_EXAMPLES} training examples are not "
                                "scored, else fresh (said in one line)", needs_pool=True))
register_head_source(HeadSource("fresh", _fresh, "the seeded random head (Lodha et al.'s setting; the ranking is then "
                                "nearly label-free)"))
register_head_source(HeadSource("probe", _probe, "the model's own head fitted first with the backbone frozen (a linear "
                                "probe on cached features of --probe-examples training examples not scored)", needs_pool=True))
register_head_source(HeadSource("path", _from_checkpoint, "the head of a checkpoint folder (as --save-head writes)"))


# --------------------------------------------------------------------------------------------------
# the examples a head may fit on, and the one call both passes make
# --------------------------------------------------------------------------------------------------


def probe_pool(cfg: "ScoreConfig", scored: Examples, limit: int) -> Examples:
    """Up to ``limit`` training examples (seeded) of ``cfg``'s task, none of whose texts is among ``scored``."""
    full = examples_for(replace(cfg, split="train", num_examples=None, balanced=False))
    taken = set(zip(scored.text_a, scored.text_b or [None] * len(scored)))
    keep = [i for i, key in enumerate(zip(full.text_a, full.text_b or [None] * len(full))) if key not in taken]
    if len(keep) > limit:
        keep = sorted(np.random.default_rng([cfg.seed, 0x9B0BE]).choice(keep, size=limit, replace=False).tolist())
    return full.subset(keep)


def setup_head(cfg: "ScoreConfig", spec: str, probe_examples: int, model: nn.Module, tokenizer: Any, layer_map: LayerMap,
               task: TaskSpec, device: torch.device | str, progress: bool) -> PreparedHead:
    """The head of one scoring run (both passes): the pool of training examples not scored, then the source."""
    tokenised: list[list[dict]] = []

    def pool() -> list[dict]:
        if not tokenised:
            examples = probe_pool(cfg, examples_for(cfg), probe_examples)
            tokenised.append(tokenize_examples(examples, tokenizer, cfg.max_length))
        return tokenised[0]

    request = HeadRequest(model, tokenizer, layer_map, task, pool, seed=cfg.seed, batch_size=cfg.batch_size,
                          device=device, progress=progress, pool_limit=probe_examples)
    return prepare_head(spec, request)


def save_head(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """The model with the head it scored with as a Hugging Face checkpoint folder (loadable by
    ``AutoModelForSequenceClassification.from_pretrained``), written into a temporary folder and renamed."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"fastsel: --save-head {out} is a file; give a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        to_save = copy.deepcopy(model).to("cpu") if next(model.parameters()).device.type != "cpu" else model
        to_save.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
