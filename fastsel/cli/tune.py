"""``fastsel plan`` and ``fastsel finetune``: strategies into plans, plans into trained models."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from fastsel.data.specs import get_task
from fastsel.hf.layer_map import map_layers
from fastsel.hf.loading import check_encoder_classifier, check_model_folder, resolve_model_path
from fastsel.pipeline.heads import fits_on_pool
from fastsel.plans.plan import Plan, PlanError
from fastsel.plans.request import PlanRequest
from fastsel.plans.strategies import build_plan, check_tuner, find_strategy
from fastsel.scores.layer_scores import LayerScores
from fastsel.train.export import peft_note
from fastsel.train.config import TrainConfig
from fastsel.train.finetune import FinetuneJob, run_finetune
from fastsel.tuners.apply import meta_model, with_counts
from fastsel.utils.settings import JsonSettings, add_setting_arguments, differs_from_default, setting, values_from_args

__all__ = ["add_plan_command", "add_finetune_command", "load_config", "read_plan", "PlanCommand"]


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


def _plan_from_request(req: PlanRequest, num_layers: int, task: str, scores=None) -> Plan:

    if scores is None and req.scores_path:
        scores = read_scores(req.scores_path)
    return build_plan(req.strategy, num_layers, scores=scores, tuner=req.tuner, lora=req.lora_spec(),
                      adapter_size=req.adapter_size, task=task or "")


def _num_labels(req: "PlanCommand") -> int:
    if req.num_labels is not None:
        if req.num_labels < 1:
            raise ValueError(f"fastsel: --num-labels must be >= 1 (1: a regression head), got {req.num_labels}")
        return req.num_labels

    task = get_task(req.task)
    return 1 if task.is_regression else task.num_labels


@dataclass(kw_only=True)
class PlanCommand(PlanRequest, JsonSettings):
    """``fastsel plan``: a plan request, the model whose config it is counted on, and where it goes."""

    model: str = setting(help="model directory, config.json file or hub name", required=True)
    task: str = setting("sst2", "sets the number of labels of the head")
    num_labels: int | None = setting(None, "overrides --task")
    peft: bool = setting(False, "also print the PEFT LoraConfig export, and a note on what of the plan it cannot express")
    out: str | None = setting(None, "write plan.json here")


def add_plan_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="build a tuning plan and count its trainable parameters (config only, no weights)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_setting_arguments(p, PlanCommand)
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:

    req = PlanCommand(**values_from_args(PlanCommand, args))
    if not req.strategy:
        raise PlanError("fastsel: --strategy is required")
    check_tuner(req.strategy, req.tuner)
    if req.scores_path and find_strategy(req.strategy)[0].needs is None:
        raise ValueError(f"fastsel: --scores does not apply to strategy {req.strategy!r}, which uses no scores; "
                         "leave --scores out")
    if req.out and req.scores_path and Path(req.out).resolve() == Path(req.scores_path).resolve():
        raise ValueError(f"fastsel: --out {req.out} is the --scores file: writing the plan would overwrite the scores")
    if req.out and Path(req.out).expanduser().is_dir():
        raise ValueError(f"fastsel: --out {req.out} is a folder; give a file name (e.g. {Path(req.out) / 'plan.json'})")
    if req.out:  # a folder in its path that is a file, no permission: one line naming --out, before the work
        from fastsel.cli.app import check_writable

        check_writable(req.out, "--out")
    config = load_config(req.model, _num_labels(req))
    layer_map = map_layers(meta_model(config))
    scores = None
    if req.scores_path:
        scores = read_scores(req.scores_path)
        check_scores_fit(scores, layer_map, req.scores_path, req.model)
    plan = _plan_from_request(req, layer_map.num_layers, req.task, scores)
    check_tuning_sizes(config, **_plan_sizes(plan))
    _check_unused_flags(req, lora=plan.lora_spec is not None, adapter=_plan_sizes(plan)["adapter_size"] is not None)
    plan = with_counts(plan, config)
    print(plan.table())
    if req.peft:
        if plan.tuned_layers("lora"):
            print("PEFT LoraConfig:", json.dumps(plan.to_peft(layer_map.model_type, layers_pattern=layer_map.blocks_name.rsplit(".", 1)[-1],
                                                               head_names=layer_map.head_names)))
        note = peft_note(plan)
        if note:
            print(note)
    if req.out:
        plan.to_json(req.out)
        print(f"wrote {req.out}")
    return 0


def add_finetune_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="score -> plan -> train in one command; results.json and a curve plot",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_setting_arguments(p, FinetuneJob, required=("task",))
    add_setting_arguments(p.add_argument_group("training"), TrainConfig)
    p.set_defaults(func=_run_finetune)


_RANK_NEEDS = "--rank-epochs"
_LORA_NEEDS = "--tuner lora (or a lora-*/spafit-* strategy)"


def _check_unused_flags(req: PlanRequest, *, lora: bool, adapter: bool) -> None:
    """One-line ValueError for a tuning flag given a value that the plan would not use (silently ignored otherwise):
    LoRA flags without LoRA tuning, --adapter-size without adapters; finetune: the flags of a pass not made."""
    plan_path = getattr(req, "plan_path", None)
    what = (f"--plan {plan_path}" if plan_path else f"--strategy {req.strategy}"
            + (f" --tuner {req.tuner}" if req.tuner != "full" else ""))
    given = req.tuning_flags_given()
    unused = [("--lora-r", given["--lora-r"], not lora, _LORA_NEEDS),
              ("--lora-alpha", given["--lora-alpha"], not lora, _LORA_NEEDS),
              ("--lora-dropout", given["--lora-dropout"], not lora, _LORA_NEEDS),
              ("--adapter-size", given["--adapter-size"], not adapter, "--tuner adapter")]
    if isinstance(req, FinetuneJob):
        scores_itself = bool(req.strategy) and find_strategy(req.strategy)[0].needs is not None and not req.scores_path
        unused += [("--rank-examples", differs_from_default(req, "rank_examples"), not req.rank_epochs, _RANK_NEEDS),
                   ("--rank-split", differs_from_default(req, "rank_split"), not req.rank_epochs, _RANK_NEEDS),
                   ("--probe-examples", differs_from_default(req, "probe_examples"),
                    not fits_on_pool(req.head), "--head auto, probe or warmup:STEPS"),
                   ("--fisher", differs_from_default(req, "fisher_mode"), not scores_itself,
                    "a --strategy that scores the layers itself (fisher-*, without --scores)")]
    for flag, was_given, ignored, needs in unused:
        if was_given and ignored:
            raise ValueError(f"fastsel: {flag} only applies with {needs}; {what} would ignore it: leave {flag} out")


def _check_finetune_job(job: FinetuneJob) -> None:
    """One-line ValueErrors, before any loading, for files and flag combinations that would train something else
    than asked (the job's own ranges are checked when it is made)."""
    out = Path(job.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"fastsel: --out {job.out} is a file; give a folder (the run directory: results.json, the "
                         "trained model, the curve plot)")
    if job.plan_path:  # the plan file sets the tuning: the flags that make a plan would be ignored
        given = {"--scores": bool(job.scores_path), **job.tuning_flags_given()}
        for flag in ("--tuner", "--scores", "--lora-r", "--lora-alpha", "--lora-dropout", "--adapter-size"):
            if given[flag]:
                raise ValueError(f"fastsel: {flag} only applies with --strategy; with --plan {job.plan_path} the plan file "
                                 f"sets the tuning: leave {flag} out (or make the plan with it: fastsel plan ... {flag} ...)")
        _check_unused_flags(job, lora=True, adapter=True)
        plan = read_plan(job.plan_path)
        try:
            config = load_config(job.model, 2)
        except Exception:  # noqa: BLE001 - run_finetune reads it again and reports what is wrong, in one line
            return
        check_tuning_sizes(config, **_plan_sizes(plan), source=job.plan_path)
        return
    check_tuner(job.strategy, job.tuner)
    strategy, _ = find_strategy(job.strategy)
    if job.scores_path and strategy.needs is None:
        raise ValueError(f"fastsel: --scores does not apply to strategy {job.strategy!r}, which uses no scores; "
                         "leave --scores out")
    lora = job.tuner == "lora" or strategy.name.startswith(("lora-", "spafit-"))
    adapter = job.tuner == "adapter"
    _check_unused_flags(job, lora=lora, adapter=adapter)
    if not (lora or adapter or job.scores_path):
        return
    try:
        config = load_config(job.model, 2)
    except (OSError, ValueError):
        return  # loading the model reports it
    check_tuning_sizes(config, lora_r=job.lora_r if lora else None, adapter_size=job.adapter_size if adapter else None)
    if job.scores_path:
        check_scores_fit(read_scores(job.scores_path), map_layers(meta_model(config)), job.scores_path, job.model)


def _run_finetune(args: argparse.Namespace) -> int:

    job = FinetuneJob(**values_from_args(FinetuneJob, args), train=TrainConfig(**values_from_args(TrainConfig, args)))
    _check_finetune_job(job)
    results = run_finetune(job)
    best = results["best"]
    print(f"best epoch {best['epoch']}: " + ", ".join(f"{k}={v:.4f}" for k, v in best["metrics"].items()))
    print(f"trainable params {results['trainable_params']:,}; mean epoch time {results['epoch_seconds_mean']:.1f}s; "
          f"wrote {Path(job.out) / 'results.json'}")
    return 0
