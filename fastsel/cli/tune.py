"""``fastsel plan`` and ``fastsel finetune``: strategies into plans, plans into trained models."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastsel.cli.app import add_custom_data_arguments, check_custom_data_flags
from fastsel.data.specs import get_task
from fastsel.hf.layer_map import map_layers
from fastsel.hf.loading import check_encoder_classifier, check_model_folder, resolve_model_path
from fastsel.plans.plan import LoraSpec, Plan, PlanError
from fastsel.plans.strategies import TUNERS, build_plan, check_tuner, find_strategy, strategy_names
from fastsel.scores.fisher import FISHER_MODES
from fastsel.scores.layer_scores import LayerScores
from fastsel.train.export import peft_note
from fastsel.train.trainer import RANK_SPLITS, FinetuneJob, run_finetune
from fastsel.tuners.apply import meta_model, with_counts

__all__ = ["add_plan_command", "add_finetune_command", "load_config", "read_plan"]


def load_config(model: str, num_labels: int):
    """The model's config (a local directory, a config.json file or a hub name), with ``num_labels``."""
    from transformers import AutoConfig, PretrainedConfig

    path = Path(model)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"fastsel: --model {model} is not a config.json ({exc}); give the config.json of the model, "
                             "or its folder") from None
        if not isinstance(data, dict):
            raise ValueError(f"fastsel: --model {model} is not a config.json (not a JSON object)")
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"fastsel: {model} has no 'model_type'; it is not a transformers config.json")
        cfg: PretrainedConfig = AutoConfig.for_model(model_type, **data)
        cfg.num_labels = num_labels
        check_encoder_classifier(cfg, model)
        return cfg
    resolved = resolve_model_path(model)
    check_model_folder(model, resolved, weights=False)  # plan reads the config only
    try:
        cfg = AutoConfig.from_pretrained(resolved, num_labels=num_labels, local_files_only=Path(resolved).is_dir())
    except (OSError, ValueError) as exc:
        raise OSError(f"fastsel: could not read the config of {model!r}: {exc}") from exc
    check_encoder_classifier(cfg, model)
    return cfg


def read_scores(path: str):
    """A scores.json as LayerScores; a file that is not one is a one-line ValueError naming it (and --scores)."""
    try:
        return LayerScores.read(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"fastsel: --scores {path}: no such file; write one with fastsel score --out") from None
    except IsADirectoryError:
        raise ValueError(f"fastsel: --scores {path} is a folder; give the scores.json file") from None
    except ValueError as exc:
        text = str(exc).removeprefix("fastsel: ")
        fix = "; give the scores.json that fastsel score --out wrote" if "not a scores.json" in text else ""
        raise ValueError(f"fastsel: --scores {text}{fix}") from None


def read_plan(path: str) -> Plan:
    """The plan.json given as ``--plan``; a file that is missing, not JSON (truncated) or not a plan is a one-line
    error naming the flag and the file."""
    try:
        return Plan.from_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"fastsel: --plan {path}: no such file; write one with fastsel plan --out") from None
    except IsADirectoryError:
        raise ValueError(f"fastsel: --plan {path} is a folder; give the plan.json file") from None
    except UnicodeDecodeError:
        raise ValueError(f"fastsel: --plan {path} is not a plan.json (not UTF-8 text); write one with fastsel plan --out") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"fastsel: --plan {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}: "
                         "truncated or edited?); write it again with fastsel plan --out") from None
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        why = str(exc).removeprefix("fastsel: ") if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"fastsel: --plan {path} is not a fastsel plan ({why}); write one with fastsel plan --out") from None


def check_scores_fit(scores: LayerScores, layer_map, path: str, model: str) -> None:
    """One-line ValueError when ``scores`` (read from ``path``) are not of the blocks of ``model``: another number
    of blocks, or blocks of other names (scores of another architecture); a block name may be given in short
    (``layer.3`` for ``bert.encoder.layer.3``)."""
    fix = f"score {model} itself (fastsel score --model {model} --out ...), or give the scores.json of this model"
    if len(scores.layers) != layer_map.num_layers:
        raise ValueError(f"fastsel: --scores {path} scores {len(scores.layers)} blocks but {model} has "
                         f"{layer_map.num_layers}: {fix}")
    for s in scores.layers:
        want = layer_map.block_name(s.layer)
        if s.name and not (want == s.name or want.endswith("." + s.name) or s.name.endswith("." + want)):
            raise ValueError(f"fastsel: --scores {path}: block {s.layer} is {s.name!r} there but {want!r} in {model} "
                             f"(scores of another model): {fix}")


def _plan_sizes(plan: Plan) -> dict[str, int | None]:
    """The LoRA rank and the largest adapter bottleneck a plan uses (None: not used)."""
    return {"lora_r": plan.lora_spec.r if plan.lora_spec else None,
            "adapter_size": max((t.adapter_size or 0 for t in plan.blocks), default=0) or None}


def check_tuning_sizes(config, *, lora_r: int | None, adapter_size: int | None, source: str | None = None) -> None:
    """One-line ValueError when the LoRA rank or the adapter bottleneck exceeds the model's hidden size (a LoRA
    update of a width-H matrix has rank <= H; a bottleneck wider than H is none); None: not used. ``source``: the
    plan file they come from (else the flags)."""
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int) or hidden < 1:
        return
    for flag, value, what in (("--lora-r", lora_r, "LoRA rank"), ("--adapter-size", adapter_size, "adapter bottleneck")):
        if value is not None and value > hidden and source:
            raise ValueError(f"fastsel: --plan {source}: its {what} is {value}, more than the model's hidden size, {hidden} "
                             f"(it must be 1..{hidden}): fix the plan, or make it again with fastsel plan")
        if value is not None and value > hidden:
            raise ValueError(f"fastsel: {flag} {value}: the {what} must be at most the model's hidden size, {hidden} "
                             f"(use {flag} 1..{hidden})")


def _add_plan_arguments(p: argparse.ArgumentParser) -> None:

    p.add_argument("--strategy", default=None, help=f"one of: {', '.join(strategy_names())}")
    p.add_argument("--scores", default=None, help="scores.json for score-based strategies")
    p.add_argument("--tuner", choices=TUNERS, default="full", help="how layer-selecting strategies tune the selected blocks")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=_lora_alpha, default="2*r",
                   help="LoRA alpha (the update is scaled by alpha/r); 2*r: twice --lora-r, whatever --lora-r is")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--adapter-size", type=int, default=256, help="bottleneck width of the adapters (--tuner adapter)")


def _lora_alpha(text: str) -> float | None:
    """--lora-alpha: a number, or 2*r (None: twice the rank)."""
    if text.replace(" ", "").lower() in ("2*r", "2r"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 2*r, not {text!r}") from None


def _alpha(args: argparse.Namespace) -> float:
    return 2 * args.lora_r if args.lora_alpha is None else args.lora_alpha


def _plan_from_args(args: argparse.Namespace, num_layers: int, scores=None):

    if scores is None and args.scores:
        scores = read_scores(args.scores)
    return build_plan(args.strategy, num_layers, scores=scores, tuner=args.tuner,
                      lora=LoraSpec(r=args.lora_r, alpha=_alpha(args), dropout=args.lora_dropout),
                      adapter_size=args.adapter_size, task=getattr(args, "task", "") or "")


def _num_labels(args: argparse.Namespace) -> int:
    if getattr(args, "num_labels", None) is not None:
        if args.num_labels < 1:
            raise ValueError(f"fastsel: --num-labels must be >= 1 (1: a regression head), got {args.num_labels}")
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
    p.add_argument("--peft", action="store_true",
                   help="also print the PEFT LoraConfig export, and a note on what of the plan it cannot express")
    p.add_argument("--out", default=None, help="write plan.json here")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:

    if not args.strategy:
        raise PlanError("fastsel: --strategy is required")
    check_tuner(args.strategy, args.tuner)
    if args.scores and find_strategy(args.strategy)[0].needs is None:
        raise ValueError(f"fastsel: --scores does not apply to strategy {args.strategy!r}, which uses no scores; "
                         "leave --scores out")
    if args.out and args.scores and Path(args.out).resolve() == Path(args.scores).resolve():
        raise ValueError(f"fastsel: --out {args.out} is the --scores file: writing the plan would overwrite the scores")
    if args.out and Path(args.out).expanduser().is_dir():
        raise ValueError(f"fastsel: --out {args.out} is a folder; give a file name (e.g. {Path(args.out) / 'plan.json'})")
    if args.out:  # a folder in its path that is a file, no permission: one line naming --out, before the work
        from fastsel.cli.app import check_writable

        check_writable(args.out, "--out")
    config = load_config(args.model, _num_labels(args))
    layer_map = map_layers(meta_model(config))
    scores = None
    if args.scores:
        scores = read_scores(args.scores)
        check_scores_fit(scores, layer_map, args.scores, args.model)
    plan = _plan_from_args(args, layer_map.num_layers, scores)
    check_tuning_sizes(config, **_plan_sizes(plan))
    _check_unused_flags(args, lora=plan.lora_spec is not None, adapter=_plan_sizes(plan)["adapter_size"] is not None)
    plan = with_counts(plan, config)
    print(plan.table())
    if args.peft:
        if plan.tuned_layers("lora"):
            print("PEFT LoraConfig:", json.dumps(plan.to_peft(layer_map.model_type, layers_pattern=layer_map.blocks_name.rsplit(".", 1)[-1],
                                                               head_names=layer_map.head_names)))
        note = peft_note(plan)
        if note:
            print(note)
    if args.out:
        plan.to_json(args.out)
        print(f"wrote {args.out}")
    return 0


def add_finetune_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="score -> plan -> train in one command; results.json and a curve plot",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="minilm", help="local directory or hub name")
    p.add_argument("--task", required=True, help="GLUE/SuperGLUE task name, or 'custom' with --data-file")
    p.add_argument("--data-dir", default=None, help="folder with glue/ and superglue/ (or a GLUE_DIR); omit to use the hub")
    add_custom_data_arguments(p, eval_file=True)
    p.add_argument("--plan", default=None, help="plan.json (instead of --strategy)")
    _add_plan_arguments(p)
    p.add_argument("--score-examples", type=int, default=512, help="training examples used to score layers")
    p.add_argument("--fisher", default="empirical", choices=FISHER_MODES, help="Fisher mode for fisher-* strategies")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (linear warmup, then linear decay)")
    p.add_argument("--batch-size", type=int, default=16, help="training examples per step")
    p.add_argument("--warmup-ratio", type=float, default=0.06, help="share of the steps spent warming up")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are truncated)")
    p.add_argument("--train-examples", type=int, default=None, help="balanced random training subset")
    p.add_argument("--eval-examples", type=int, default=None, help="random validation subset (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets, the head and the shuffling")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--cache-prefix", choices=("auto", "on", "off"), default="auto",
                   help="train on cached outputs of a frozen bottom (auto: when the plan allows it)")
    p.add_argument("--rank-epochs", default="", help="comma-separated epochs at which to re-rank layers by Fisher")
    p.add_argument("--rank-examples", type=int, default=256, help="--rank-epochs: examples of each Fisher pass")
    p.add_argument("--rank-split", choices=tuple(RANK_SPLITS), default="train",
                   help="examples of the --rank-epochs Fisher passes: training ones, held-out validation ones, or both "
                        "(reported as rank_stability and rank_stability_heldout)")
    p.add_argument("--head", default="fresh", metavar="fresh|probe|warmup:STEPS|DIR",
                   help="the head every strategy starts from and scores with: fresh (seeded random), probe (fitted first "
                        "on the frozen backbone), warmup:STEPS (a short full fine-tuning) or a checkpoint folder "
                        "(docs/task_aware.md)")
    p.add_argument("--probe-examples", type=int, default=1000, metavar="N",
                   help="--head probe / warmup: training examples it fits on (taken after the --score-examples ones)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (fastsel's, transformers', datasets')")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps (always at each epoch end) to OUT/train-state.pt")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT/train-state.pt (same settings; same result as "
                        "uninterrupted); with another --epochs, the run goes on to that many epochs (a finished one "
                        "too, if it kept its state with --keep-checkpoints)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep OUT/train-state.pt once training has finished, so that --resume --epochs N can extend "
                        "the run later (default: removed; results.json and the trained model stay)")
    p.add_argument("--out", required=True, help="run directory")
    p.set_defaults(func=_run_finetune)


def _epochs(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(e) for e in text.split(",") if e.strip())
    except ValueError:
        raise ValueError(f"fastsel: --rank-epochs takes comma-separated epoch numbers (e.g. 1,3), got {text!r}") from None


def _check_unused_flags(args: argparse.Namespace, *, lora: bool, adapter: bool) -> None:
    """One-line ValueError for a tuning flag given a value that the plan would not use (silently ignored otherwise):
    LoRA flags without LoRA tuning, --adapter-size without adapters; finetune: the flags of a pass not made."""
    what = (f"--plan {args.plan}" if getattr(args, "plan", None) else f"--strategy {args.strategy}"
            + (f" --tuner {args.tuner}" if args.tuner != "full" else ""))
    unused = [("--lora-r", args.lora_r != 8, not lora, "--tuner lora (or a lora-*/spafit-* strategy)"),
              ("--lora-alpha", args.lora_alpha is not None, not lora, "--tuner lora (or a lora-*/spafit-* strategy)"),
              ("--lora-dropout", args.lora_dropout != 0.0, not lora, "--tuner lora (or a lora-*/spafit-* strategy)"),
              ("--adapter-size", args.adapter_size != 256, not adapter, "--tuner adapter")]
    if args.command == "finetune":
        head = str(args.head)
        scores_itself = bool(args.strategy) and find_strategy(args.strategy)[0].needs is not None and not args.scores
        unused += [("--rank-examples", args.rank_examples != 256, not _epochs(args.rank_epochs), "--rank-epochs"),
                   ("--rank-split", args.rank_split != "train", not _epochs(args.rank_epochs), "--rank-epochs"),
                   ("--probe-examples", args.probe_examples != 1000, not head.startswith(("probe", "warmup")),
                    "--head probe or --head warmup:STEPS"),
                   ("--fisher", args.fisher != "empirical", not scores_itself,
                    "a --strategy that scores the layers itself (fisher-*, without --scores)")]
    for flag, given, ignored, needs in unused:
        if given and ignored:
            raise ValueError(f"fastsel: {flag} only applies with {needs}; {what} would ignore it: leave {flag} out")


def _check_finetune_args(args: argparse.Namespace) -> None:
    """One-line ValueErrors, before any loading, for values that would train something else than asked."""
    check_custom_data_flags(args)
    if not 0 <= args.seed < 2**32:  # numpy's seeds (the data subsets, the shuffling)
        raise ValueError(f"fastsel: --seed must be in 0..{2**32 - 1}, got {args.seed}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"fastsel: --out {args.out} is a file; give a folder (the run directory: results.json, the "
                         "trained model, the curve plot)")
    if args.max_length < 2:  # as fastsel score: [CLS] and [SEP] leave no room for text below 2
        raise ValueError(f"fastsel: --max-length must be >= 2 tokens, got {args.max_length}")
    for flag, value in (("--score-examples", args.score_examples), ("--rank-examples", args.rank_examples)):
        if value < 1:
            raise ValueError(f"fastsel: {flag} must be >= 1, got {value}")
    bad = [e for e in _epochs(args.rank_epochs) if not 0 <= e <= args.epochs]
    if bad:
        raise ValueError(f"fastsel: --rank-epochs {args.rank_epochs}: epoch(s) {bad} outside 0..{args.epochs} "
                         f"(0: before training, {args.epochs}: after the last of --epochs {args.epochs})")
    if args.plan:  # the plan file sets the tuning: the flags that make a plan would be ignored
        for flag, given in (("--tuner", args.tuner != "full"), ("--scores", bool(args.scores)),
                            ("--lora-r", args.lora_r != 8), ("--lora-alpha", args.lora_alpha is not None),
                            ("--lora-dropout", args.lora_dropout != 0.0), ("--adapter-size", args.adapter_size != 256)):
            if given:
                raise ValueError(f"fastsel: {flag} only applies with --strategy; with --plan {args.plan} the plan file sets "
                                 f"the tuning: leave {flag} out (or make the plan with it: fastsel plan ... {flag} ...)")
        _check_unused_flags(args, lora=True, adapter=True)
        plan = read_plan(args.plan)
        try:
            config = load_config(args.model, 2)
        except Exception:  # noqa: BLE001 - run_finetune reads it again and reports what is wrong, in one line
            return
        check_tuning_sizes(config, **_plan_sizes(plan), source=args.plan)
        return
    check_tuner(args.strategy, args.tuner)
    strategy, _ = find_strategy(args.strategy)
    if args.scores and strategy.needs is None:
        raise ValueError(f"fastsel: --scores does not apply to strategy {args.strategy!r}, which uses no scores; "
                         "leave --scores out")
    lora = args.tuner == "lora" or strategy.name.startswith(("lora-", "spafit-"))
    adapter = args.tuner == "adapter"
    _check_unused_flags(args, lora=lora, adapter=adapter)
    if not (lora or adapter or args.scores):
        return
    try:
        config = load_config(args.model, 2)
    except (OSError, ValueError):
        return  # loading the model reports it
    check_tuning_sizes(config, lora_r=args.lora_r if lora else None, adapter_size=args.adapter_size if adapter else None)
    if args.scores:
        check_scores_fit(read_scores(args.scores), map_layers(meta_model(config)), args.scores, args.model)


def _run_finetune(args: argparse.Namespace) -> int:

    if bool(args.plan) == bool(args.strategy):
        raise ValueError("fastsel: give exactly one of --plan and --strategy")
    _check_finetune_args(args)
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
        head=args.head, probe_examples=args.probe_examples, data_file=args.data_file, eval_file=args.eval_file,
        text_fields=tuple(f for f in args.text_fields.split(",") if f), label_field=args.label_field,
        regression=args.regression,
        checkpoint_every=args.checkpoint_every, resume=args.resume, keep_checkpoints=args.keep_checkpoints,
    )
    results = run_finetune(job)
    best = results["best"]
    print(f"best epoch {best['epoch']}: " + ", ".join(f"{k}={v:.4f}" for k, v in best["metrics"].items()))
    print(f"trainable params {results['trainable_params']:,}; mean epoch time {results['epoch_seconds_mean']:.1f}s; "
          f"wrote {Path(args.out) / 'results.json'}")
    return 0
