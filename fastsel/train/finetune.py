"""``fastsel finetune``: score -> plan -> train -> results.json, the trained model and a curve plot.

:class:`FinetuneJob` holds everything a run needs (settings fields from which the command makes its flags; the
optimisation settings are its ``train`` :class:`fastsel.train.config.TrainConfig`); :func:`run_finetune` runs it.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastsel.data.examples import Examples, subsample
from fastsel.data.features import make_dataloader, tokenize_examples
from fastsel.data.readers import load_custom_examples, load_examples
from fastsel.data.settings import CUSTOM_TASK, DataSettings
from fastsel.data.specs import TaskSpec, get_task
from fastsel.hf.loading import clamp_max_length, load_model
from fastsel.pipeline.config import DEFAULT_MODEL, ScoreConfig
from fastsel.pipeline.heads import (
    AUTO_MIN_EXAMPLES,
    DEFAULT_HEAD,
    HEAD_METAVAR,
    HeadRequest,
    parse_head,
    prepare_head,
)
from fastsel.pipeline.inmemory import run_scoring
from fastsel.pipeline.registry import METRICS
from fastsel.plans.plan import Plan
from fastsel.plans.request import PlanRequest
from fastsel.plans.strategies import build_plan, find_strategy
from fastsel.scores.fisher import FISHER_MODES, fisher_layer_scores
from fastsel.scores.layer_scores import LayerScores
from fastsel.train.config import TrainConfig
from fastsel.train.export import EXPORT_DIR, export_trained, tuning_summary
from fastsel.train.loop import EpochCallback, TrainResult, train_model
from fastsel.train.rank_stability import RankStability
from fastsel.train.saved import save_trained
from fastsel.tuners.apply import apply_plan, with_counts
from fastsel.utils.atomic import atomic_savefig, atomic_write_json
from fastsel.utils.settings import JsonSettings, comma_ints, setting

__all__ = ["FinetuneJob", "TRAIN_STATE", "EVAL_SHARE", "RANK_SPLITS", "RANK_CALLBACK_NAMES", "job_examples",
           "plot_curves", "run_finetune"]

TRAIN_STATE = "train-state.pt"
EVAL_SHARE = 0.1  # custom data without an eval file: this share of the file (at least one example) is held out
RANK_SPLITS = {"train": ("train",), "validation": ("validation",), "both": ("train", "validation")}
RANK_CALLBACK_NAMES = {"train": "rank_stability", "validation": "rank_stability_heldout"}


@dataclass(kw_only=True)
class FinetuneJob(DataSettings, PlanRequest, JsonSettings):
    """Everything ``fastsel finetune`` needs (see ``fastsel finetune --help``): the data (:class:`DataSettings`), the
    plan (a ``plan_path`` or a :class:`PlanRequest`), the scoring and the head, and ``train``, the optimisation.
    Validated on construction (one-line ValueErrors)."""

    task: str = setting(help="GLUE/SuperGLUE task name, or 'custom' with --data-file", required=True)
    model: str = setting(DEFAULT_MODEL, "local directory or hub name")
    out: str = setting(help="run directory", required=True)
    plan_path: str | None = setting(None, "plan.json (instead of --strategy)", flag="--plan")
    eval_file: str | None = setting(None, "custom CSV/TSV/JSONL file of the evaluation examples (same columns and "
                                    "classes as --data-file); default: a seeded 10%% of --data-file is held out (never "
                                    "trained on)")
    score_examples: int = setting(512, "training examples used to score layers")
    fisher_mode: str = setting("empirical", "Fisher mode for fisher-* strategies", flag="--fisher", choices=FISHER_MODES)
    max_length: int = setting(128, "tokens per example (longer ones are truncated)")
    train_examples: int | None = setting(None, "balanced random training subset")
    eval_examples: int | None = setting(None, "random validation subset (default: all)")
    rank_epochs: tuple[int, ...] = setting((), "comma-separated epochs at which to re-rank layers by Fisher",
                                           type=comma_ints, metavar="E[,E...]")
    rank_examples: int = setting(256, "--rank-epochs: examples of each Fisher pass")
    rank_split: str = setting("train", "examples of the --rank-epochs Fisher passes: training ones, held-out validation "
                              "ones, or both (reported as rank_stability and rank_stability_heldout)",
                              choices=tuple(RANK_SPLITS))
    head: str = setting(DEFAULT_HEAD, "the head every strategy starts from and scores with: auto (probe when at "
                        f"least {AUTO_MIN_EXAMPLES} training examples are left after the --score-examples ones, else "
                        "fresh), probe (fitted first on the frozen backbone), fresh (seeded random), warmup:STEPS (a "
                        "short full fine-tuning) or a checkpoint folder (docs/task_aware.md)", metavar=HEAD_METAVAR)
    probe_examples: int = setting(1000, "--head auto / probe / warmup: training examples it fits on (taken after the "
                                  "--score-examples ones)", metavar="N")
    keep_checkpoints: bool = setting(False, "keep OUT/train-state.pt once training has finished, so that --resume "
                                     "--epochs N can extend the run later (default: removed; results.json and the "
                                     "trained model stay)")
    train: TrainConfig = setting(default_factory=TrainConfig, help="the optimisation settings", cli=False)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        self.rank_epochs = comma_ints(self.rank_epochs)
        if bool(self.plan_path) == bool(self.strategy):
            raise ValueError("fastsel: give exactly one of --plan and --strategy")
        self.check_data()
        if self.eval_file and self.data_file and \
                Path(self.eval_file).expanduser().resolve() == Path(self.data_file).expanduser().resolve():
            raise ValueError(f"fastsel: --eval-file {self.eval_file} is the --data-file: the model would be evaluated "
                             "on its training examples; give a file of other examples, or leave --eval-file out (then "
                             f"{EVAL_SHARE:.0%} of --data-file is held out)")
        parse_head(self.head)  # a bad --head fails before any data or model is loaded
        if self.fisher_mode not in FISHER_MODES:
            raise ValueError(f"fastsel: fisher_mode (--fisher) must be one of {FISHER_MODES}, got {self.fisher_mode!r}")
        if self.rank_split not in RANK_SPLITS:
            raise ValueError(f"fastsel: --rank-split must be one of {sorted(RANK_SPLITS)}, got {self.rank_split!r}")
        if self.max_length < 2:  # as fastsel score: [CLS] and [SEP] leave no room for text below 2
            raise ValueError(f"fastsel: --max-length must be >= 2 tokens, got {self.max_length}")
        for flag, value in (("--score-examples", self.score_examples), ("--rank-examples", self.rank_examples)):
            if value < 1:
                raise ValueError(f"fastsel: {flag} must be >= 1, got {value}")
        if self.probe_examples < 10:
            raise ValueError(f"fastsel: --probe-examples must be >= 10, got {self.probe_examples}")
        for flag, value in (("--train-examples", self.train_examples), ("--eval-examples", self.eval_examples)):
            if value is not None and value < 1:
                raise ValueError(f"fastsel: {flag} must be >= 1 (leave it out for all the examples), got {value}")
        epochs = self.train.epochs
        bad = [e for e in self.rank_epochs if not 0 <= e <= epochs]
        if bad:
            given = ",".join(map(str, self.rank_epochs))
            raise ValueError(f"fastsel: --rank-epochs {given}: epoch(s) {bad} outside 0..{epochs} (0: before "
                             f"training, {epochs}: after the last of --epochs {epochs})")

    def custom_flags_given(self) -> dict[str, bool]:
        return {**super().custom_flags_given(), "--eval-file": self.eval_file is not None}


TRAIN_STATE = "train-state.pt"
EVAL_SHARE = 0.1  # custom data without an eval file: this share of the file (at least one example) is held out
RANK_SPLITS = {"train": ("train",), "validation": ("validation",), "both": ("train", "validation")}
RANK_CALLBACK_NAMES = {"train": "rank_stability", "validation": "rank_stability_heldout"}


def job_examples(job: FinetuneJob) -> tuple[TaskSpec, Examples, Examples, str]:
    """The task, training and evaluation examples of a job, and where the evaluation ones come from. A GLUE/SuperGLUE
    task: its train and validation splits. Task "custom": ``data_file`` for training and ``eval_file`` (its labels
    mapped onto the training file's classes) for evaluation, or, without one, a seeded ``EVAL_SHARE`` of
    ``data_file`` held out (never trained on). Then the seeded subsets of ``train_examples`` (class-balanced) and
    ``eval_examples``. The job's flags were checked when it was made."""
    if job.task != CUSTOM_TASK:
        spec = get_task(job.task)
        train_ex = load_examples(spec, job.data_dir, "train")
        eval_ex = load_examples(spec, job.data_dir, "validation")
        source = f"the {spec.name} validation split"
    else:
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
            order = np.random.default_rng([job.train.seed, 0x4556414C]).permutation(len(full))  # own stream: "EVAL"
            held = max(1, int(round(EVAL_SHARE * len(full))))
            eval_ex, train_ex = full.subset(sorted(order[:held])), full.subset(sorted(order[held:]))
            source = (f"{held} of the {len(full)} examples of {Path(job.data_file).expanduser().resolve()} held out "
                      f"({EVAL_SHARE:.0%}, seed {job.train.seed}; not trained on)")
    train_ex = subsample(train_ex, job.train_examples, job.train.seed,
                         balanced=job.train_examples is not None and not spec.is_regression)
    eval_ex = subsample(eval_ex, job.eval_examples, job.train.seed, balanced=False)
    return spec, train_ex, eval_ex, source


def _score_for(job: FinetuneJob, metric: str, model, tokenizer, layer_map, train_features, out: Path):
    """Scores for a score-based strategy: Fisher on the loaded model, other metrics through fastsel.pipeline."""
    t = job.train
    if job.scores_path:
        return LayerScores.read(job.scores_path)
    if metric in ("fisher", "scores"):
        feats = train_features[: job.score_examples]
        scores, _ = fisher_layer_scores(model, make_dataloader(feats, tokenizer, 16), mode=job.fisher_mode, seed=t.seed,
                                        total=len(feats), progress=t.progress, layer_map=layer_map,
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
                                         num_examples=job.score_examples, balanced=not job.regression, seed=t.seed,
                                         max_length=job.max_length, device=t.device, data_file=job.data_file,
                                         text_fields=job.text_fields, label_field=job.label_field,
                                         regression=job.regression), progress=t.progress)
    scores.to_json(out / "scores.json")
    return scores


def plot_curves(result: TrainResult, path: Path, title: str) -> None:
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
    out = Path(job.out)
    if job.train.state_file not in (None, str(out / TRAIN_STATE)):
        raise ValueError(f"fastsel: a finetune run keeps its training state in OUT/{TRAIN_STATE}; leave "
                         f"train.state_file unset (got {job.train.state_file!r})")
    if job.train.resume and not (out / TRAIN_STATE).exists() and (out / "results.json").is_file():
        raise ValueError(f"fastsel: --resume: the run in {job.out} has finished and its training state was removed "
                         f"({TRAIN_STATE}; kept only with --keep-checkpoints), so it cannot go on; train again without "
                         "--resume, with --keep-checkpoints to be able to extend the run later with more --epochs")
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(job.train, state_file=str(out / TRAIN_STATE))
    spec, train_ex, eval_ex, eval_source = job_examples(job)
    num_labels = 1 if spec.is_regression else spec.num_labels
    model, tokenizer, layer_map = load_model(job.model, num_labels=num_labels, seed=cfg.seed, device=cfg.device)
    job.max_length, limit = clamp_max_length(job.max_length, model.config, job.model)
    train_features = tokenize_examples(train_ex, tokenizer, job.max_length)
    eval_features = tokenize_examples(eval_ex, tokenizer, job.max_length)
    # The head every strategy starts from (and scores with): fitted on training examples that are not scored.
    pool = train_features[job.score_examples:][: job.probe_examples]
    head = prepare_head(job.head, HeadRequest(model, tokenizer, layer_map, spec, lambda: list(pool), seed=cfg.seed,
                                              batch_size=cfg.batch_size, device=cfg.device, progress=cfg.progress,
                                              pool_limit=job.probe_examples))
    if head.fits_labels and cfg.progress:
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
                          lora=job.lora_spec(),
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
            callbacks.append(RankStability(feats[: job.rank_examples], tokenizer, job.rank_epochs, seed=cfg.seed,
                                           device=cfg.device, progress=cfg.progress, name=RANK_CALLBACK_NAMES[split]))
    result = train_model(model, plan, train_features, eval_features, spec, tokenizer, cfg, callbacks=callbacks)
    save_trained(model, plan, out, base_model=job.model, num_labels=num_labels, seed=cfg.seed)
    export = export_trained(model, plan, out / EXPORT_DIR, base_model=job.model, num_labels=num_labels)
    results = {
        "job": job.to_dict(),
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
    plot_curves(result, out / "curve.png", f"{plan.strategy} on {spec.name} ({layer_map.model_type}, "
                                             f"{result.trainable_params:,} trainable)")
    if not job.keep_checkpoints:  # the trained model and results.json are written: the training state is not needed
        (out / TRAIN_STATE).unlink(missing_ok=True)
    return results
