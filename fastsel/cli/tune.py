"""``fastsel plan`` and ``fastsel finetune``: strategies into plans, plans into trained models."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastsel.data.tasks import get_task
from fastsel.hf.layer_map import map_layers
from fastsel.hf.loading import resolve_model_path
from fastsel.plans.plan import LoraSpec, PlanError
from fastsel.plans.strategies import TUNERS, build_plan, strategy_names
from fastsel.scores.layer_scores import LayerScores
from fastsel.train.trainer import RANK_SPLITS, FinetuneJob, run_finetune
from fastsel.tuners.apply import meta_model, with_counts

__all__ = ["add_plan_command", "add_finetune_command", "load_config"]


def load_config(model: str, num_labels: int):
    """The model's config (a local directory, a config.json file or a hub name), with ``num_labels``."""
    from transformers import AutoConfig, PretrainedConfig

    path = Path(model)
    if path.is_file():
        data = json.loads(path.read_text())
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"fastsel: {model} has no 'model_type'; it is not a transformers config.json")
        cfg: PretrainedConfig = AutoConfig.for_model(model_type, **data)
        cfg.num_labels = num_labels
        return cfg
    resolved = resolve_model_path(model)
    try:
        return AutoConfig.from_pretrained(resolved, num_labels=num_labels, local_files_only=Path(resolved).is_dir())
    except (OSError, ValueError) as exc:
        raise OSError(f"fastsel: could not read the config of {model!r}: {exc}") from exc


def read_scores(path: str):
    """A scores.json as LayerScores; a file that is not one is a one-line ValueError naming it."""

    return LayerScores.read(path)


def _add_plan_arguments(p: argparse.ArgumentParser) -> None:

    p.add_argument("--strategy", default=None, help=f"one of: {', '.join(strategy_names())}")
    p.add_argument("--scores", default=None, help="scores.json for score-based strategies")
    p.add_argument("--tuner", choices=TUNERS, default="full", help="how layer-selecting strategies tune the selected blocks")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-alpha", type=float, default=128)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--adapter-size", type=int, default=256)


def _plan_from_args(args: argparse.Namespace, num_layers: int, scores=None):

    if scores is None and args.scores:
        scores = read_scores(args.scores)
    return build_plan(args.strategy, num_layers, scores=scores, tuner=args.tuner,
                      lora=LoraSpec(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout),
                      adapter_size=args.adapter_size)


def _num_labels(args: argparse.Namespace) -> int:
    if getattr(args, "num_labels", None):
        return args.num_labels

    task = get_task(args.task)
    return 1 if task.is_regression else task.num_labels


def add_plan_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="build a tuning plan and count its trainable parameters (config only, no weights)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model directory, config.json file or hub name")
    _add_plan_arguments(p)
    p.add_argument("--task", default="sst2", help="sets the number of labels of the head")
    p.add_argument("--num-labels", type=int, default=None, help="overrides --task")
    p.add_argument("--peft", action="store_true", help="also print the PEFT LoraConfig export")
    p.add_argument("--out", default=None, help="write plan.json here")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:

    if not args.strategy:
        raise PlanError("fastsel: --strategy is required")
    config = load_config(args.model, _num_labels(args))
    layer_map = map_layers(meta_model(config))
    plan = with_counts(_plan_from_args(args, layer_map.num_layers), config)
    print(plan.table())
    if args.peft:
        print("PEFT LoraConfig:", json.dumps(plan.to_peft(layer_map.model_type, layers_pattern=layer_map.blocks_name.rsplit(".", 1)[-1],
                                                           head_names=layer_map.head_names)))
    if args.out:
        plan.to_json(args.out)
        print(f"wrote {args.out}")
    return 0


def add_finetune_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="score -> plan -> train in one command; results.json and a curve plot",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="minilm", help="local directory or hub name")
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--plan", default=None, help="plan.json (instead of --strategy)")
    _add_plan_arguments(p)
    p.add_argument("--score-examples", type=int, default=512, help="training examples used to score layers")
    p.add_argument("--fisher", default="empirical", help="Fisher mode for fisher-* strategies")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--train-examples", type=int, default=None, help="balanced random training subset")
    p.add_argument("--eval-examples", type=int, default=None, help="random validation subset (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-prefix", choices=("auto", "on", "off"), default="auto",
                   help="train on cached outputs of a frozen bottom (auto: when the plan allows it)")
    p.add_argument("--rank-epochs", default="", help="comma-separated epochs at which to re-rank layers by Fisher")
    p.add_argument("--rank-examples", type=int, default=256)
    p.add_argument("--rank-split", choices=tuple(RANK_SPLITS), default="train",
                   help="examples of the --rank-epochs Fisher passes: training ones, held-out validation ones, or both "
                        "(reported as rank_stability and rank_stability_heldout)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps (always at each epoch end) to OUT/train-state.pt")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT/train-state.pt (same settings; same result as uninterrupted)")
    p.add_argument("--out", required=True, help="run directory")
    p.set_defaults(func=_run_finetune)


def _epochs(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(e) for e in text.split(",") if e.strip())
    except ValueError:
        raise ValueError(f"fastsel: --rank-epochs takes comma-separated epoch numbers (e.g. 1,3), got {text!r}") from None


def _run_finetune(args: argparse.Namespace) -> int:

    if bool(args.plan) == bool(args.strategy):
        raise ValueError("fastsel: give exactly one of --plan and --strategy")
    job = FinetuneJob(
        model=args.model, task=args.task, data_dir=args.data_dir, out=args.out, plan_path=args.plan,
        strategy=args.strategy, scores_path=args.scores, tuner=args.tuner, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, adapter_size=args.adapter_size,
        score_examples=args.score_examples, fisher_mode=args.fisher, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
        max_length=args.max_length, train_examples=args.train_examples, eval_examples=args.eval_examples,
        seed=args.seed, device=args.device, cache_prefix=args.cache_prefix,
        rank_epochs=_epochs(args.rank_epochs),
        rank_examples=args.rank_examples, rank_split=args.rank_split, progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every, resume=args.resume,
    )
    results = run_finetune(job)
    best = results["best"]
    print(f"best epoch {best['epoch']}: " + ", ".join(f"{k}={v:.4f}" for k, v in best["metrics"].items()))
    print(f"trainable params {results['trainable_params']:,}; mean epoch time {results['epoch_seconds_mean']:.1f}s; "
          f"wrote {Path(args.out) / 'results.json'}")
    return 0
