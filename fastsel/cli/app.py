"""The ``fastsel`` command line: ``score``, ``info`` (and the commands other modules register).

Subcommands are a registry (``COMMANDS``): each entry adds its parser and returns the function to run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable

from fastsel.cli.info import format_info, info
from fastsel.data.settings import DataSettings
from fastsel.pipeline.config import PipelineConfig, ScoreConfig
from fastsel.pipeline.distributed import process_rank
from fastsel.pipeline.heads import DEFAULT_HEAD, fits_on_pool
from fastsel.pipeline.outputs import output_path
from fastsel.pipeline.registry import METRICS, default_num_examples
from fastsel.pipeline.run import score
from fastsel.utils.settings import JsonSettings, add_setting_arguments, check_needs, setting, values_from_args

__all__ = ["main", "COMMANDS", "check_device", "check_score_flags", "ScoreOutputs"]

# name -> "module:function" adding the subparser (a registry of commands; plan and finetune import lazily)
COMMANDS: dict[str, str] = {
    "score": "fastsel.cli.app:add_score_command",
    "info": "fastsel.cli.app:add_info_command",
    "plan": "fastsel.cli.tune:add_plan_command",
    "finetune": "fastsel.cli.tune:add_finetune_command",
}


@dataclass
class ScoreOutputs(JsonSettings):
    """What ``fastsel score`` writes besides computing (not part of the scores' settings)."""

    out: str | None = setting(None, "write scores.json here")
    plot: str | None = setting(None, "write a PNG plot here")
    progress: bool = setting(True, "no progress bars (fastsel's, transformers', datasets')", flag="--no-progress")


def add_score_command(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("score", help="score every layer of an encoder on a task", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_setting_arguments(p, ScoreConfig, only=("metric", "model"))
    add_setting_arguments(p, ScoreConfig, skip=("metric", "model"))
    add_setting_arguments(p, ScoreOutputs)
    # fastsel score removes a finished pass's checkpoints unless --keep-checkpoints (the Python default keeps them)
    add_setting_arguments(p.add_argument_group("large corpora, several processes (torchrun), checkpoints"), PipelineConfig,
                          defaults={"keep_checkpoints": False})
    base = {a.dest for a in p._actions}
    taken = {flag for a in p._actions for flag in a.option_strings}
    _add_metric_groups(p, taken)
    p.set_defaults(func=_run_score, _base_dests=base)


def _add_metric_groups(p: argparse.ArgumentParser, taken: set[str]) -> None:
    """The metrics' flags, in help groups titled with every metric that has them (``--metric cca, variability``):
    a flag several metrics share (--pooling, --probe) is listed once, under all of them."""
    from dataclasses import fields

    owners: dict[str, list[str]] = {}  # option field -> the metrics whose options have it
    for metric in METRICS.values():
        for f in fields(metric.options) if metric.options is not None else ():
            owners.setdefault(f.name, []).append(metric.name)
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for metric in METRICS.values():
        for f in fields(metric.options) if metric.options is not None else ():
            key = tuple(owners[f.name])
            if key not in groups:
                groups[key] = p.add_argument_group(f"--metric {', '.join(key)}")
            add_setting_arguments(groups[key], metric.options, taken=taken, only={f.name})
        if metric.add_arguments is not None:
            key = (metric.name,)
            if key not in groups:
                groups[key] = p.add_argument_group(f"--metric {metric.name}")
            metric.add_arguments(groups[key])  # type: ignore[arg-type]


def check_writable(path: str | os.PathLike, what: str, *, directory: bool = False) -> None:
    """OSError (one line) now, not after the pass, when ``path`` cannot be written: a temporary file is created
    (and removed) where the output will go. Leaves nothing behind."""
    import tempfile
    from pathlib import Path

    target = Path(path).expanduser()
    folder = target if directory else target.parent
    if not directory and target.is_dir():
        raise IsADirectoryError(f"{what} {str(target)!r} is a directory; give a file name")
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{what} {str(target)!r} cannot be written: {str(parent)!r} is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fastsel-probe-", delete=True) as f:
            f.write(b"x")
            f.flush()
    except OSError as exc:
        raise OSError(f"{what} {str(target)!r} cannot be written ({exc.strerror or exc})") from None


def check_score_flags(args: argparse.Namespace) -> None:
    """One-line ValueError, before anything runs, for a flag that would be ignored and for outputs that would
    overwrite each other (or the data); ``--plot`` becomes the path matplotlib will write (PATH -> PATH.png)."""
    check_needs(args, PipelineConfig)
    DataSettings(**values_from_args(DataSettings, args)).check_data()  # custom-data flags without --task custom
    _check_metric_options(args)
    if args.plot:
        args.plot = plot_file(args.plot)
    names = [m for m in str(args.metric).split(",") if m]
    claimed: dict[object, tuple[str, str]] = {}
    paths = [("--data-file", args.data_file)] + [(flag, output_path(p, m, len(names)) if p else None)
                                                 for flag, p in (("--out", args.out), ("--plot", args.plot)) for m in names]
    for flag, path in [*paths, ("--checkpoint", args.checkpoint_dir)]:
        if not path:
            continue
        key = os.path.abspath(os.path.expanduser(str(path)))
        if key in claimed and claimed[key][0] != flag:
            other, first = claimed[key]
            raise ValueError(f"fastsel: {flag} {path} is the same path as {other} {first}: one would overwrite the "
                             f"other; give {flag} a name of its own")
        claimed.setdefault(key, (flag, str(path)))


def _check_metric_options(args: argparse.Namespace) -> None:
    """One-line ValueError for a metric option (a field of a metric's options dataclass) given a value while none of
    the --metric metrics has it, and for the options that only mean something with another one."""
    from dataclasses import MISSING, fields

    chosen = {m for m in str(args.metric).split(",") if m in METRICS}
    owners: dict[str, tuple[object, set[str]]] = {}  # dest -> (its default, the metrics that have it)
    for metric in METRICS.values():
        for f in fields(metric.options) if metric.options is not None else ():
            owners.setdefault(f.name, (f.default, set()))[1].add(metric.name)

    def given(dest: str) -> bool:
        default = owners[dest][0] if dest in owners else MISSING
        return dest in owners and getattr(args, dest, default) != default

    for dest, (_, metrics) in owners.items():
        if chosen and given(dest) and not metrics & chosen:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"fastsel: {flag} only applies with --metric {' or '.join(sorted(metrics))}; --metric "
                             f"{args.metric} would ignore it: add that metric, or leave {flag} out")
    if given("probe_examples") and not fits_on_pool(getattr(args, "head", DEFAULT_HEAD)):
        raise ValueError("fastsel: --probe-examples only applies with --head auto, probe or warmup:STEPS (the examples "
                         "the head is fitted on); leave --probe-examples out")
    for dest in ("probe_c", "probe_eval_examples"):
        if given(dest) and "probe" not in chosen and not getattr(args, "probe", False):
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"fastsel: {flag} only applies with --probe or --metric probe (the per-layer probes); "
                             f"add one, or leave {flag} out")


def plot_file(path: str | os.PathLike) -> str:
    """The file a plot to ``path`` lands in: matplotlib writes PNG to ``path.png`` when ``path`` has no suffix, and
    takes a suffix as the image format (ValueError, one line, for one it cannot write)."""
    text = str(path)
    suffix = os.path.splitext(os.path.basename(text))[1].lower().lstrip(".")
    if not suffix:
        return text + ".png"
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise ValueError(f"fastsel: --plot {text}: matplotlib cannot write .{suffix} files; end the name in .png "
                         f"(or one of .{', .'.join(sorted(formats))})")
    return text


def _run_score(args: argparse.Namespace) -> int:

    check_score_flags(args)
    options = {k: v for k, v in vars(args).items() if k not in args._base_dests and not k.startswith("_") and k != "func"}
    main_process = process_rank() == 0
    if main_process:  # fail before the pass, not after it
        for path, what in ((args.out, "--out"), (args.plot, "--plot")):
            if path:
                check_writable(path, what)
    if args.checkpoint_dir:
        check_writable(args.checkpoint_dir, "--checkpoint", directory=True)
    if args.cache_dir:
        check_writable(args.cache_dir, "--cache-dir", directory=True)
    values = values_from_args(ScoreConfig, args)
    if args.num_examples is None and not args.until_stable:
        values["num_examples"] = default_num_examples(args.metric)
    cfg = ScoreConfig(**values, options=options)
    pcfg = PipelineConfig(**{"keep_checkpoints": False, **values_from_args(PipelineConfig, args)})
    results = score(cfg, pcfg, out=args.out, plot=args.plot, progress=args.progress)
    if not main_process:
        return 0
    for name, scores in results.items():
        print(scores.table())
        if args.out:
            print(f"wrote {output_path(args.out, name, len(results))}")
        if args.plot:
            print(f"wrote {output_path(args.plot, name, len(results))}")
    return 0


def add_info_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="version, torch/CUDA, and which backend each op uses and why")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:

    from fastsel.ops.backend import env_problem

    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    problem = env_problem()  # a FASTSEL_BACKEND that scoring would fail on: not "everything fine"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


def check_device(spec: str) -> None:
    """Raise ValueError (one line) when ``--device spec`` cannot run here: an unknown device string, CUDA on a
    CPU-only torch or with no GPU visible, an index past the visible devices."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {spec!r} is not a device ({str(exc).splitlines()[0]})") from None
    if device.type == "cpu" or device.type == "meta":
        return
    if device.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ValueError(f"--device {spec}: this torch ({torch.__version__}) is a CPU-only build; "
                             "install a CUDA build of torch, or use --device cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no CUDA GPU is visible to torch {torch.__version__} "
                             "(check the driver and CUDA_VISIBLE_DEVICES), or use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {spec}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
        return
    backend = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"--device {spec}: no {device.type} device is available to torch {torch.__version__}")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what> (see fastsel <command> --help)``, exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastsel", description="Which layers of a pretrained encoder to fine-tune.")
    sub = parser.add_subparsers(dest="command", required=True)
    for target in COMMANDS.values():
        module, func = target.split(":")
        adder: Callable = getattr(importlib.import_module(module), func)
        adder(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (torchrun stopping the other ranks after one failed, a scheduler preempting the job)."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    try:
        if isinstance(getattr(args, "device", None), str):
            check_device(args.device)
        if args.command in ("score", "finetune"):  # before loading anything, not at the first batch
            from fastsel.ops.backend import env_problem

            if env_problem():
                raise ValueError(env_problem())
        from fastsel.hf.loading import no_progress_bars

        with no_progress_bars(not getattr(args, "progress", True)):  # transformers', datasets' bars too
            return int(args.func(args) or 0)
    except Terminated:
        rank = os.environ.get("RANK")
        why = " (under torchrun: another rank failed or the job was stopped)" if rank is not None else ""
        hint = _resume_hint(args) or ("with --checkpoint DIR a rerun with --resume continues where it stopped"
                                      if args.command == "score" else "")
        print(f"error: fastsel: stopped by SIGTERM{why}; files are written atomically" + (f"; {hint}" if hint else ""),
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        hint = _resume_hint(args)
        print("fastsel: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        # Bad input gets one clear line, not a traceback; FASTSEL_DEBUG=1 shows the traceback.
        if os.environ.get("FASTSEL_DEBUG"):
            raise
        print(f"error: {_describe(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug of fastsel: still one line, the traceback on demand
        if os.environ.get("FASTSEL_DEBUG"):
            raise
        if _unreadable_file(exc):  # a reader fastsel did not wrap: still the user's file, not a bug to report
            print(f"error: fastsel: a file could not be read ({type(exc).__name__}: {_one_line(exc)[:200]}): it is "
                  "truncated or damaged; rerun with FASTSEL_DEBUG=1 to see which, then replace or delete it",
                  file=sys.stderr)
            return 2
        print(f"error: internal error ({type(exc).__name__}: {_one_line(exc)}); rerun with FASTSEL_DEBUG=1 for the "
              "traceback and please report it", file=sys.stderr)
        return 1


def _resume_hint(args: argparse.Namespace) -> str | None:
    """For an interrupted ``score --checkpoint DIR`` or ``finetune``: where its checkpoint is and how to continue from
    it (None when it left none)."""
    from pathlib import Path

    try:
        if args.command == "score" and getattr(args, "checkpoint_dir", None):
            where = Path(args.checkpoint_dir)
            found = where.is_dir() and any(where.glob("rank*-of-*.pt"))
        elif args.command == "finetune" and getattr(args, "out", None):
            from fastsel.train.finetune import TRAIN_STATE

            where = Path(args.out) / TRAIN_STATE
            found = where.is_file()
        else:
            return None
    except OSError:
        return None
    if not found:
        return None
    return f"the checkpoint {where} is kept: rerun the same command{'' if args.resume else ' with --resume'} to continue"


def _unreadable_file(exc: BaseException) -> bool:
    """An exception of a file reader (safetensors, pickle, a zip archive) meaning that the file is damaged."""
    import pickle
    import zipfile

    return (type(exc).__name__ == "SafetensorError" or isinstance(exc, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile)))


def _describe(exc: BaseException) -> str:
    """One line for an exception; OSErrors without the file name in their text get it added."""
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in str(exc):
        return _one_line(f"{exc.strerror or exc}: {exc.filename}")
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror and exc.filename:
        return _one_line(f"{exc.strerror}: {exc.filename}")
    return _one_line(exc)


if __name__ == "__main__":
    sys.exit(main())
