"""Issue 24 item 2: every flag of ``fastsel score``, ``plan`` and ``finetune``, generated from the CLI's own parser.

For each flag the table ``CASES`` holds (the flags that make it apply, a valid non-default value, how its effect is
observed, out-of-range values, and optionally what it needs). Three checks per flag:

* valid: the flag set to a non-default value changes what is observed (scores.json, plan.json, results.json, the
  files written, the output) against the same command without it;
* bad: every out-of-range value is refused with exactly one ``error:`` line (exit code 2) naming the flag;
* needs: a flag that only applies with another one, given without it, is refused with one ``error:`` line naming
  the flag it needs (instead of being silently ignored).

A flag the parser has and the table lacks fails ``test_every_parser_flag_has_a_case`` (and its own parametrized
cases): a new flag must come with its entry. Tiny models only (tiny_dir), a few examples, --max-length 16.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from fastsel.cli.app import build_parser
from tests.cli_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

COMMANDS = ("score", "plan", "finetune")


def parser_flags() -> dict[str, dict[str, argparse.Action]]:
    """{command: {first option string: action}} of every optional flag of the three commands (not --help)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {cmd: {a.option_strings[0]: a for a in sub.choices[cmd]._actions
                  if a.option_strings and not isinstance(a, argparse._HelpAction)} for cmd in COMMANDS}


FLAGS = parser_flags()


# -- running a command in process -----------------------------------------------------------------------------


def _strict(text: str) -> Any:
    def no(c):
        raise ValueError(f"{c} in JSON output")

    return json.loads(text, parse_constant=no)


@dataclass
class Result:
    rc: int
    out: str
    err: str
    run: Path  # the folder of this run's outputs
    main_file: Path  # scores.json / plan.json / results.json
    data: dict = field(default_factory=dict)  # main_file as it was right after the run (strict JSON)

    def __post_init__(self) -> None:
        if self.rc == 0 and self.main_file.exists():
            self.data = _strict(self.main_file.read_text())

    def file(self, rel: str) -> dict:
        p = self.run / rel
        return _strict(p.read_text()) if p.exists() else {}

    def files(self, rel: str = ".") -> list[str]:
        p = self.run / rel
        return sorted(f.name for f in p.iterdir()) if p.is_dir() else []

    def errors(self) -> list[str]:
        return [l for l in self.err.splitlines() if l.startswith("error:")]


def base_argv(command: str, extra: list[str]) -> tuple[list[str], str]:
    """The command's fixed flags (the entry's flags come after them: argparse keeps the last value) and the
    main output file relative to the run folder."""
    data = [] if "custom" in extra else ["--data-dir", "{data}"]  # custom data comes from --data-file alone
    if command == "score":
        return ["score", "--model", "{tiny}", "--task", "sst2", *data, "--num-examples", "8",
                "--max-length", "16", "--out", "{run}/s.json"], "s.json"
    if command == "plan":
        strategy = [] if "--strategy" in extra else ["--strategy", "position-top-1"]
        return ["plan", "--model", "{tiny}", *strategy, "--out", "{run}/plan.json"], "plan.json"
    strategy = [] if {"--strategy", "--plan"} & set(extra) else ["--strategy", "position-top-1"]
    return ["finetune", "--model", "{tiny}", "--task", "rte", *data, *strategy, "--epochs", "1",
            "--train-examples", "16", "--eval-examples", "8", "--max-length", "16", "--out", "{run}/run"], "run/results.json"


class Runner:
    def __init__(self, places: dict[str, str], tmp: Path) -> None:
        self.places, self.tmp, self.n, self.cache = places, tmp, 0, {}

    def __call__(self, command: str, extra: list[str], *, progress: bool = False, cached: bool = False,
                 main: str | None = None) -> Result:
        key = (command, tuple(extra), progress)
        if cached and key in self.cache:
            return self.cache[key]
        self.n += 1
        run = self.tmp / f"run{self.n}"
        run.mkdir()
        base, main_file = base_argv(command, extra)
        argv = [a.format(**self.places, run=run) for a in base + list(extra)]
        if not progress and "--no-progress" in FLAGS[command]:
            argv.append("--no-progress")
        rc, out, err = run_cli(argv)
        result = Result(rc, out, err, run, Path(main.format(**self.places)) if main else run / main_file)
        if cached:
            self.cache[key] = result
        return result


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_dir, data_dir) -> dict[str, str]:
    """What the table's {names} stand for: the model, the data, and files made here."""
    tmp = tmp_path_factory.mktemp("every-flag-files")
    tiny2 = tmp / "tiny-copy"  # the same model in another folder
    shutil.copytree(tiny_dir, tiny2)
    config4 = tmp / "config4.json"  # a 4-block model's config.json (plan reads configs only)
    cfg = json.loads((Path(tiny_dir) / "config.json").read_text())
    config4.write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    data2 = tmp / "data2"  # a smaller copy of two GLUE tasks
    for task in ("SST-2", "RTE"):
        (data2 / "glue" / task).mkdir(parents=True)
        for split in ("train.tsv", "dev.tsv"):
            lines = (Path(data_dir) / "glue" / task / split).read_text().splitlines(keepends=True)
            (data2 / "glue" / task / split).write_text("".join(lines[:41]))
    rows = [("a good film", "fine and fresh", 0, 1), ("bad and dull", "slow", 1, 1), ("a great cast", "the plot", 0, 0),
            ("boring story", "thin", 1, 0)] * 4
    for name, n in (("custom.csv", 16), ("custom2.csv", 12)):
        (tmp / name).write_text("text,text2,y,y2\n" + "".join(f"{a} {i},{b},{y},{z}\n" for i, (a, b, y, z) in
                                                              enumerate(rows[:n])))
    afile = tmp / "a-file"
    afile.write_text("not a folder\n")
    scores = tmp / "scores.json"  # block 0 is the best
    scores.write_text(json.dumps({"metric": "fisher", "model": "tiny", "task": "rte", "layers": [
        {"layer": l, "name": f"bert.encoder.layer.{l}", "score": float(3 - l)} for l in range(3)]}))
    plan = tmp / "plan.json"
    rc, _, err = run_cli(["plan", "--model", tiny_dir, "--strategy", "bitfit", "--out", str(plan)])
    assert rc == 0, err
    return {"tiny": str(tiny_dir), "tiny2": str(tiny2), "config4": str(config4), "data": str(data_dir),
            "data2": str(data2), "custom": str(tmp / "custom.csv"), "custom2": str(tmp / "custom2.csv"),
            "afile": str(afile), "scores": str(scores), "plan": str(plan), "tmp": str(tmp)}


@pytest.fixture(scope="module")
def runner(places, tmp_path_factory) -> Runner:
    return Runner(places, tmp_path_factory.mktemp("every-flag-runs"))


# -- the table ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    valid: list[str]  # the flag with a valid non-default value (and anything that must come with it)
    observe: Callable[[Result], Any]  # what the flag changes (compared with the run of `context` alone)
    bad: list[list[str]]  # out-of-range values: each refused with one error line
    context: list[str] = field(default_factory=list)  # flags that make the flag apply (also in the baseline)
    needs: tuple[list[str], str] | None = None  # (the flag given without its context, the flag the error names)
    progress: bool = False  # runs without --no-progress
    names: tuple[str, ...] = ()  # words the error line of a bad value may name instead of the flag
    main: str | None = None  # the main output file when not the run folder's (a fixed --out in `context`)


def cfg(key: str) -> Callable[[Result], Any]:
    return lambda r: r.data.get("config", {}).get(key)


def opt(key: str) -> Callable[[Result], Any]:
    return lambda r: r.data.get("config", {}).get("options", {}).get(key)


def pipe(key: str) -> Callable[[Result], Any]:
    return lambda r: r.data.get("pipeline", {}).get(key)


def top(*keys: str) -> Callable[[Result], Any]:
    def get(r: Result):
        d: Any = r.data
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d
    return get


def job(key: str) -> Callable[[Result], Any]:
    """A results.json job setting: a FinetuneJob field, or one of its training settings (job["train"])."""
    def get(r: Result):
        j = r.data.get("job", {})
        return j[key] if key in j else j.get("train", {}).get(key)
    return get


def scores_of(r: Result) -> list[float]:
    return [l["score"] for l in r.data.get("layers", [])]


def files(rel: str = ".") -> Callable[[Result], Any]:
    return lambda r: (r.rc, r.files(rel))


def stderr_has(text: str) -> Callable[[Result], Any]:
    return lambda r: (r.rc, text in r.err)


def stdout_has(text: str) -> Callable[[Result], Any]:
    return lambda r: (r.rc, text in r.out)


def switch_bad(flag: str) -> list[list[str]]:
    return [[f"{flag}=yes"]]  # a switch takes no value


CUSTOM = ["--task", "custom", "--data-file", "{custom}", "--text-fields", "text", "--label-field", "y"]
FISHER_FT = ["--strategy", "fisher-top-1", "--score-examples", "8"]

CASES: dict[tuple[str, str], Case] = {
    # ---- score ----
    ("score", "--metric"): Case(["--metric", "variability"], top("metric"), [["--metric", "nope"], ["--metric", ""],
                                                                            ["--metric", "fisher,nope"]]),
    ("score", "--model"): Case(["--model", "{tiny2}"], top("model"), [["--model", "{afile}"], ["--model", "{tmp}/nosuch"]]),
    ("score", "--task"): Case(["--task", "rte"], top("task"), [["--task", "nosuch"]]),
    ("score", "--data-dir"): Case(["--data-dir", "{data2}"], cfg("data_dir"), [["--data-dir", "{afile}"],
                                                                              ["--data-dir", "{tmp}/nosuch"]]),
    ("score", "--split"): Case(["--split", "validation"], top("split"), [["--split", "bogus"]]),
    ("score", "--num-examples"): Case(["--num-examples", "12"], top("num_examples"),
                                      [["--num-examples", "0"], ["--num-examples", "-3"], ["--num-examples", "x"]]),
    ("score", "--balanced"): Case(["--balanced"], cfg("balanced"), switch_bad("--balanced")),
    ("score", "--batch-size"): Case(["--batch-size", "4"], pipe("batches"), [["--batch-size", "0"], ["--batch-size", "-1"],
                                                                             ["--batch-size", "2.5"]]),
    ("score", "--max-length"): Case(["--max-length", "24"], cfg("max_length"), [["--max-length", "0"], ["--max-length", "1"],
                                                                                ["--max-length", "-4"]]),
    ("score", "--seed"): Case(["--seed", "3"], scores_of, [["--seed", "-1"], ["--seed", str(2**70)]]),
    ("score", "--device"): Case(["--device", "cpu:0"], cfg("device"), [["--device", "nonsense"], ["--device", "tpu"]]),
    ("score", "--data-file"): Case(["--data-file", "{custom2}"], top("num_examples"),
                                   [["--data-file", "{tmp}/nosuch.csv"], ["--data-file", "{tmp}"]],
                                   context=CUSTOM + ["--num-examples", "16"],
                                   needs=(["--data-file", "{custom}"], "--task custom")),
    ("score", "--text-fields"): Case(["--text-fields", "text,text2"], cfg("text_fields"),
                                     [["--text-fields", "nosuch"], ["--text-fields", ",,"]], context=CUSTOM,
                                     needs=(["--text-fields", "text"], "--task custom")),
    ("score", "--label-field"): Case(["--label-field", "y2"], scores_of, [["--label-field", "nosuch"]], context=CUSTOM,
                                     needs=(["--label-field", "y"], "--task custom")),
    ("score", "--regression"): Case(["--regression"], cfg("regression"), switch_bad("--regression"), context=CUSTOM,
                                    needs=(["--regression"], "--task custom")),
    ("score", "--out"): Case(["--out", "{run}/other.json"], files(), [["--out", "{tmp}"], ["--out", "{afile}/s.json"]]),
    ("score", "--plot"): Case(["--plot", "{run}/p.png"], files(), [["--plot", "{run}/p.json"], ["--plot", "{afile}/p.png"]]),
    ("score", "--no-progress"): Case(["--no-progress"], stderr_has("ex/s"), switch_bad("--no-progress"), progress=True),
    # batches of one example: enough batches for 4 groups; without --batch-size the few examples make one batch
    ("score", "--confidence-unit"): Case(["--batch-size", "1", "--confidence-unit", "batches"],
                                         top("ranking_confidence", "method"),
                                         [["--confidence-unit", "rows"], ["--confidence-unit", "batches"]]),
    ("score", "--confidence-groups"): Case(["--confidence-groups", "2"], top("ranking_confidence", "groups"),
                                           [["--confidence-groups", "1"], ["--confidence-groups", "-1"]]),
    ("score", "--max-tokens"): Case(["--max-tokens", "40"], pipe("max_tokens"), [["--max-tokens", "0"], ["--max-tokens", "-5"]]),
    ("score", "--bucket"): Case(["--no-bucket"], pipe("bucket"), switch_bad("--no-bucket")),
    ("score", "--autocast"): Case(["--autocast", "bf16"], pipe("autocast"), [["--autocast", "fp8"]]),
    ("score", "--checkpoint"): Case(["--checkpoint", "{run}/ck"], pipe("checkpoint_dir"), [["--checkpoint", "{afile}"]]),
    ("score", "--checkpoint-every"): Case(["--checkpoint-every", "4"], pipe("checkpoint_every_examples"),
                                          [["--checkpoint-every", "0"], ["--checkpoint-every", "-1"]],
                                          context=["--checkpoint", "{run}/ck"], needs=(["--checkpoint-every", "4"], "--checkpoint")),
    ("score", "--resume"): Case(["--resume"], pipe("tokens_this_run_rank0"), switch_bad("--resume"),
                                context=["--checkpoint", "{tmp}/resume-ck", "--keep-checkpoints"],
                                needs=(["--resume"], "--checkpoint")),
    ("score", "--keep-checkpoints"): Case(["--keep-checkpoints"], files("ck"), switch_bad("--keep-checkpoints"),
                                          context=["--checkpoint", "{run}/ck"],
                                          needs=(["--keep-checkpoints"], "--checkpoint")),
    ("score", "--prefetch"): Case(["--prefetch", "0"], pipe("prefetch"), [["--prefetch", "-1"]]),
    ("score", "--cache-dir"): Case(["--cache-dir", "{run}/cache"], files("cache"), [["--cache-dir", "{afile}"]]),
    ("score", "--until-stable"): Case(["--until-stable"], top("until_stable", "examples_available"),
                                      switch_bad("--until-stable")),
    ("score", "--stable-tau"): Case(["--stable-tau", "0.5"], top("until_stable", "stable_tau"),
                                    [["--stable-tau", "0"], ["--stable-tau", "1.5"], ["--stable-tau", "nan"],
                                     ["--stable-tau", "inf"]],
                                    context=["--until-stable"], needs=(["--stable-tau", "0.5"], "--until-stable")),
    ("score", "--check-every"): Case(["--check-every", "4"], top("until_stable", "check_every_examples"),
                                     [["--check-every", "0"], ["--check-every", "-2"]],
                                     context=["--until-stable"], needs=(["--check-every", "4"], "--until-stable")),
    ("score", "--stable-checks"): Case(["--stable-checks", "2"], top("until_stable", "stable_checks"),
                                       [["--stable-checks", "0"], ["--stable-checks", "-1"]],
                                       context=["--until-stable"], needs=(["--stable-checks", "2"], "--until-stable")),
    ("score", "--dist-timeout"): Case(["--dist-timeout", "60"], pipe("dist_timeout"),
                                      [["--dist-timeout", "0"], ["--dist-timeout", "-1"], ["--dist-timeout", "nan"],
                                       ["--dist-timeout", "inf"]]),
    ("score", "--finite-check-every"): Case(["--finite-check-every", "1"], pipe("finite_check_every"),
                                            [["--finite-check-every", "0"], ["--finite-check-every", "x"]]),
    ("score", "--cuda-graphs"): Case(["--cuda-graphs", "off"], pipe("cuda_graphs"),
                                     [["--cuda-graphs", "maybe"], ["--cuda-graphs", "on"]]),  # on: no CUDA device here
    # metric options (fastsel.pipeline.drivers): each applies to the metrics whose options have it
    ("score", "--fisher"): Case(["--fisher", "sampled"], top("mode"), [["--fisher", "bogus"]],
                                needs=(["--metric", "variability", "--fisher", "sampled"], "--metric fisher")),
    ("score", "--head"): Case(["--head", "fresh"], top("head", "kind"),
                              [["--head", "bogus"], ["--head", "warmup:-1"], ["--head", "{afile}"]],
                              needs=(["--metric", "variability", "--head", "probe"], "--metric fisher")),
    ("score", "--probe-examples"): Case(["--probe-examples", "16"], top("head", "examples"),
                                        [["--probe-examples", "5"], ["--probe-examples", "-1"]], context=["--head", "probe"],
                                        needs=(["--head", "fresh", "--probe-examples", "16"], "--head auto, probe or warmup")),
    ("score", "--aggregate"): Case(["--aggregate", "trace"], scores_of, [["--aggregate", "bogus"]],
                                   needs=(["--metric", "variability", "--aggregate", "trace"], "--metric fisher")),
    ("score", "--label-check"): Case(["--label-check", "0.5"], top("label_dependence", "examples"),
                                     [["--label-check", "1"], ["--label-check", "-0.1"], ["--label-check", "nan"]],
                                     needs=(["--metric", "variability", "--label-check", "0.5"], "--metric fisher")),
    ("score", "--save-head"): Case(["--save-head", "{run}/head"], files("head"), [["--save-head", "{afile}"]],
                                   needs=(["--metric", "variability", "--save-head", "{run}/head"], "--metric fisher")),
    ("score", "--pooling"): Case(["--pooling", "cls"], top("mode"), [["--pooling", "max"]],
                                 context=["--metric", "variability", "--num-examples", "16", "--balanced"],
                                 needs=(["--pooling", "cls"], "--metric")),
    ("score", "--probe-eval-examples"): Case(["--probe-eval-examples", "8"], top("probe_eval"),
                                             [["--probe-eval-examples", "0"], ["--probe-eval-examples", "-2"]],
                                             context=["--metric", "probe", "--num-examples", "16", "--balanced"],
                                             needs=(["--probe-eval-examples", "8"], "--probe")),
    ("score", "--probe-c"): Case(["--probe-c", "0.01"], scores_of, [["--probe-c", "0"], ["--probe-c", "-1"],
                                                                   ["--probe-c", "nan"], ["--probe-c", "inf"]],
                                 context=["--metric", "probe", "--num-examples", "16", "--balanced",
                                          "--probe-eval-examples", "16"],
                                 needs=(["--probe-c", "0.5"], "--probe")),
    ("score", "--probe"): Case(["--probe"], lambda r: sorted(r.data), switch_bad("--probe"),
                               context=["--metric", "numrank", "--num-examples", "16", "--balanced"],
                               needs=(["--probe"], "--metric")),
    ("score", "--cca-folds"): Case(["--cca-folds", "4"], top("cca_folds"), [["--cca-folds", "1"], ["--cca-folds", "0"],
                                                                          ["--cca-folds", "-1"]],
                                   context=["--metric", "cca", "--num-examples", "40", "--balanced"],
                                   needs=(["--cca-folds", "4"], "--metric cca")),
    ("score", "--variant"): Case(["--variant", "papyan"], top("mode"), [["--variant", "z"]],
                                 context=["--metric", "variability", "--num-examples", "16", "--balanced"],
                                 needs=(["--variant", "papyan"], "--metric variability")),
    # ---- plan ----
    ("plan", "--model"): Case(["--model", "{config4}"], top("num_layers"), [["--model", "{tmp}/nosuch"], ["--model", "{tmp}"]]),
    ("plan", "--strategy"): Case(["--strategy", "bitfit"], top("strategy"), [["--strategy", "nosuch"], ["--strategy", ""],
                                                                            ["--strategy", "position-top-9"]],
                                  names=("K=9",)),
    ("plan", "--scores"): Case(["--scores", "{scores}"], top("details", "layers"),
                               [["--scores", "{tmp}/nosuch.json"], ["--scores", "{afile}"], ["--scores", "{tmp}"]],
                               context=["--strategy", "fisher-top-1"], needs=(["--scores", "{scores}"], "strategy")),
    ("plan", "--tuner"): Case(["--tuner", "lora"], top("trainable_params"), [["--tuner", "bogus"]]),
    ("plan", "--lora-r"): Case(["--lora-r", "2"], top("trainable_params"), [["--lora-r", "0"], ["--lora-r", "-1"],
                                                                           ["--lora-r", "x"]], context=["--tuner", "lora"],
                               needs=(["--lora-r", "2"], "--tuner lora")),
    ("plan", "--lora-alpha"): Case(["--lora-alpha", "3"], top("blocks"), [["--lora-alpha", "nan"], ["--lora-alpha", "-1"],
                                                                          ["--lora-alpha", "0"], ["--lora-alpha", "x"]],
                                   context=["--tuner", "lora"], needs=(["--lora-alpha", "3"], "--tuner lora")),
    ("plan", "--lora-dropout"): Case(["--lora-dropout", "0.1"], top("blocks"),
                                     [["--lora-dropout", "1"], ["--lora-dropout", "-0.1"], ["--lora-dropout", "nan"]],
                                     context=["--tuner", "lora"], needs=(["--lora-dropout", "0.1"], "--tuner lora")),
    ("plan", "--adapter-size"): Case(["--adapter-size", "4"], top("trainable_params"),
                                     [["--adapter-size", "0"], ["--adapter-size", "-2"], ["--adapter-size", "17"]],
                                     context=["--tuner", "adapter", "--adapter-size", "8"], needs=(["--adapter-size", "4"], "--tuner adapter")),
    ("plan", "--task"): Case(["--task", "stsb"], top("params_by_group", "head"), [["--task", "nosuch"]]),
    ("plan", "--num-labels"): Case(["--num-labels", "5"], top("params_by_group", "head"),
                                   [["--num-labels", "0"], ["--num-labels", "-1"]]),
    ("plan", "--peft"): Case(["--peft"], stdout_has("PEFT LoraConfig"), switch_bad("--peft"), context=["--tuner", "lora"]),
    ("plan", "--out"): Case(["--out", "{run}/other.json"], files(), [["--out", "{tmp}"], ["--out", "{afile}/p.json"]]),
    # ---- finetune (--epochs 1 --train-examples 16 --eval-examples 8 on tiny_dir) ----
    ("finetune", "--model"): Case(["--model", "{tiny2}"], job("model"), [["--model", "{afile}"], ["--model", "{tmp}/nosuch"]]),
    ("finetune", "--task"): Case(["--task", "sst2"], top("task"), [["--task", "nosuch"]]),
    ("finetune", "--data-dir"): Case(["--data-dir", "{data2}"], job("data_dir"), [["--data-dir", "{afile}"],
                                                                                ["--data-dir", "{tmp}/nosuch"]]),
    ("finetune", "--data-file"): Case(["--data-file", "{custom2}"], top("num_train"),
                                      [["--data-file", "{tmp}/nosuch.csv"], ["--data-file", "{tmp}"]], context=CUSTOM,
                                      needs=(["--data-file", "{custom}"], "--task custom")),
    ("finetune", "--eval-file"): Case(["--eval-file", "{custom2}"], top("num_eval"),
                                      [["--eval-file", "{tmp}/nosuch.csv"], ["--eval-file", "{tmp}"],
                                       ["--eval-file", "{custom}"]], context=CUSTOM,
                                      needs=(["--eval-file", "{custom}"], "--task custom")),
    ("finetune", "--text-fields"): Case(["--text-fields", "text,text2"], job("text_fields"),
                                        [["--text-fields", "nosuch"], ["--text-fields", ",,"]], context=CUSTOM,
                                        needs=(["--text-fields", "text"], "--task custom")),
    ("finetune", "--label-field"): Case(["--label-field", "y2"], job("label_field"), [["--label-field", "nosuch"]],
                                        context=CUSTOM, needs=(["--label-field", "y"], "--task custom")),
    ("finetune", "--regression"): Case(["--regression"], top("main_metric"), switch_bad("--regression"), context=CUSTOM,
                                       needs=(["--regression"], "--task custom")),
    ("finetune", "--plan"): Case(["--plan", "{plan}"], top("strategy"), [["--plan", "{afile}"], ["--plan", "{tmp}"],
                                                                        ["--plan", "{tmp}/nosuch.json"]]),
    ("finetune", "--strategy"): Case(["--strategy", "bitfit"], top("strategy"), [["--strategy", "nosuch"], ["--strategy", ""]]),
    ("finetune", "--scores"): Case(["--scores", "{scores}"], lambda r: r.file("run/plan.json").get("details", {}).get("layers"),
                                   [["--scores", "{tmp}/nosuch.json"], ["--scores", "{afile}"]], context=FISHER_FT,
                                   needs=(["--scores", "{scores}"], "strategy")),
    ("finetune", "--tuner"): Case(["--tuner", "lora"], top("trainable_params"), [["--tuner", "bogus"]]),
    ("finetune", "--lora-r"): Case(["--lora-r", "2"], top("trainable_params"), [["--lora-r", "0"], ["--lora-r", "-1"]],
                                   context=["--tuner", "lora"], needs=(["--lora-r", "2"], "--tuner lora")),
    ("finetune", "--lora-alpha"): Case(["--lora-alpha", "3"], lambda r: r.file("run/plan.json").get("blocks"),
                                       [["--lora-alpha", "nan"], ["--lora-alpha", "-1"]], context=["--tuner", "lora"],
                                       needs=(["--lora-alpha", "3"], "--tuner lora")),
    ("finetune", "--lora-dropout"): Case(["--lora-dropout", "0.1"], lambda r: r.file("run/plan.json").get("blocks"),
                                         [["--lora-dropout", "1"], ["--lora-dropout", "nan"]], context=["--tuner", "lora"],
                                         needs=(["--lora-dropout", "0.1"], "--tuner lora")),
    ("finetune", "--adapter-size"): Case(["--adapter-size", "4"], top("trainable_params"),
                                         [["--adapter-size", "0"], ["--adapter-size", "-2"], ["--adapter-size", "17"]],
                                         context=["--tuner", "adapter", "--adapter-size", "8"],
                                         needs=(["--adapter-size", "4"], "--tuner adapter")),
    ("finetune", "--score-examples"): Case(["--score-examples", "12"], lambda r: r.file("run/scores.json").get("num_examples"),
                                           [["--score-examples", "0"], ["--score-examples", "-3"]],
                                           context=["--strategy", "fisher-top-1"]),
    ("finetune", "--fisher"): Case(["--fisher", "sampled"], lambda r: r.file("run/scores.json").get("mode"),
                                   [["--fisher", "bogus"]], context=FISHER_FT, needs=(["--fisher", "sampled"], "--strategy")),
    ("finetune", "--epochs"): Case(["--epochs", "2"], lambda r: len(r.data.get("history", [])),
                                   [["--epochs", "0"], ["--epochs", "-2"]]),
    ("finetune", "--lr"): Case(["--lr", "1e-3"], job("lr"), [["--lr", "0"], ["--lr", "-1"], ["--lr", "nan"], ["--lr", "inf"]]),
    ("finetune", "--batch-size"): Case(["--batch-size", "4"], job("batch_size"), [["--batch-size", "0"], ["--batch-size", "-1"]]),
    ("finetune", "--warmup-ratio"): Case(["--warmup-ratio", "0.5"], job("warmup_ratio"),
                                         [["--warmup-ratio", "1.5"], ["--warmup-ratio", "-0.1"], ["--warmup-ratio", "nan"]]),
    ("finetune", "--weight-decay"): Case(["--weight-decay", "0.1"], job("weight_decay"),
                                         [["--weight-decay", "-1"], ["--weight-decay", "nan"], ["--weight-decay", "inf"]]),
    ("finetune", "--max-length"): Case(["--max-length", "24"], job("max_length"), [["--max-length", "0"], ["--max-length", "1"]]),
    ("finetune", "--train-examples"): Case(["--train-examples", "8"], top("num_train"),
                                           [["--train-examples", "0"], ["--train-examples", "-1"]]),
    ("finetune", "--eval-examples"): Case(["--eval-examples", "4"], top("num_eval"),
                                          [["--eval-examples", "0"], ["--eval-examples", "-1"]]),
    ("finetune", "--seed"): Case(["--seed", "3"], job("seed"), [["--seed", "-1"], ["--seed", str(2**70)]]),
    ("finetune", "--device"): Case(["--device", "cpu:0"], job("device"), [["--device", "nonsense"]]),
    ("finetune", "--cache-prefix"): Case(["--cache-prefix", "off"], top("cache"), [["--cache-prefix", "maybe"]]),
    ("finetune", "--rank-epochs"): Case(["--rank-epochs", "1"], top("callbacks"), [["--rank-epochs", "x"],
                                                                                          ["--rank-epochs", "2"]]),
    ("finetune", "--rank-examples"): Case(["--rank-examples", "8"], job("rank_examples"),
                                          [["--rank-examples", "0"], ["--rank-examples", "-1"]], context=["--rank-epochs", "1"],
                                          needs=(["--rank-examples", "8"], "--rank-epochs")),
    ("finetune", "--rank-split"): Case(["--rank-split", "validation"], job("rank_split"),
                                       [["--rank-split", "test"]], context=["--rank-epochs", "1"],
                                       needs=(["--rank-split", "validation"], "--rank-epochs")),
    ("finetune", "--head"): Case(["--head", "probe", "--probe-examples", "16"], top("head", "kind"),
                                 [["--head", "bogus"], ["--head", "warmup:-1"], ["--head", "{afile}"]],
                                 context=["--train-examples", "64", "--score-examples", "8"]),
    ("finetune", "--probe-examples"): Case(["--probe-examples", "16"], top("head", "examples"),
                                           [["--probe-examples", "5"], ["--probe-examples", "-1"]],
                                           context=["--head", "probe", "--train-examples", "64", "--score-examples", "8"],
                                           needs=(["--head", "fresh", "--probe-examples", "16"],
                                                  "--head auto, probe or warmup")),
    ("finetune", "--no-progress"): Case(["--no-progress"], stderr_has("ex/s"), switch_bad("--no-progress"), progress=True),
    ("finetune", "--checkpoint-every"): Case(["--checkpoint-every", "1"], job("checkpoint_every_steps"),
                                             [["--checkpoint-every", "-1"]]),
    ("finetune", "--resume"): Case(["--resume"], job("resume"), switch_bad("--resume"),
                                   context=["--out", "{tmp}/ft-resume", "--keep-checkpoints"],
                                   main="{tmp}/ft-resume/results.json"),
    ("finetune", "--keep-checkpoints"): Case(["--keep-checkpoints"], files("run"), switch_bad("--keep-checkpoints")),
    ("finetune", "--out"): Case(["--out", "{run}/other"], files(), [["--out", "{afile}"], ["--out", "{afile}/run"]]),
}


def _ids() -> list[tuple[str, str]]:
    return sorted({(c, f) for c in COMMANDS for f in FLAGS[c]} | set(CASES))


def test_every_parser_flag_has_a_case():
    """The table covers the parser: a flag added to score/plan/finetune without an entry here fails this test."""
    missing = sorted(f"{c} {f}" for c in COMMANDS for f in FLAGS[c] if (c, f) not in CASES)
    stale = sorted(f"{c} {f}" for c, f in CASES if f not in FLAGS.get(c, {}))
    assert not missing, f"flags without an entry in CASES (add valid/bad values and how to observe them): {missing}"
    assert not stale, f"entries of flags the parser no longer has: {stale}"


def _settings_classes(command: str) -> list[type]:
    from fastsel.cli.app import ScoreOutputs
    from fastsel.cli.tune import PlanCommand
    from fastsel.pipeline.config import PipelineConfig, ScoreConfig
    from fastsel.pipeline.registry import METRICS
    from fastsel.train.config import TrainConfig
    from fastsel.train.finetune import FinetuneJob

    return {"score": [ScoreConfig, ScoreOutputs, PipelineConfig, *{m.options for m in METRICS.values() if m.options}],
            "plan": [PlanCommand], "finetune": [FinetuneJob, TrainConfig]}[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_parser_flag_is_a_settings_field(command):
    """One source of settings: each flag is made from a settings field (fastsel.utils.settings.setting) of the
    command's config classes, under that field's name and option string; no flag is written by hand."""
    from dataclasses import fields

    from fastsel.utils.settings import flag_of

    by_flag = {flag_of(f): f for cls in _settings_classes(command) for f in fields(cls)
               if f.metadata.get("cli", True) and "help" in f.metadata}
    for flag, action in FLAGS[command].items():
        assert flag in by_flag, f"fastsel {command} {flag} is not made from a settings field"
        assert action.dest == by_flag[flag].name, (flag, action.dest)
    own = {flag_of(f) for cls in _settings_classes(command)[:3] for f in fields(cls)  # not plug-in metrics' options
           if f.metadata.get("cli", True) and "help" in f.metadata}
    assert own <= set(FLAGS[command]), f"settings fields without a flag: {sorted(own - set(FLAGS[command]))}"


def _case(command: str, flag: str) -> Case:
    if (command, flag) not in CASES:
        pytest.fail(f"fastsel {command} {flag}: no entry in CASES (tests/e2e/test_every_flag.py)")
    if flag not in FLAGS[command]:
        pytest.fail(f"fastsel {command} {flag}: CASES has an entry but the parser no longer has the flag")
    return CASES[(command, flag)]


def _names(command: str, flag: str, case: Case) -> tuple[str, ...]:
    action = FLAGS[command][flag]
    return (*action.option_strings, action.dest, action.dest.replace("_", " "), *case.names)


def _value(bad: list[str], runner: Runner) -> tuple[str, ...]:
    """The bad value itself, when distinctive enough that an error quoting it names what is wrong (a path, a name)."""
    value = bad[-1].format(**runner.places, run="") if len(bad) > 1 else ""
    return (value,) if len(value) > 3 else ()


@pytest.mark.parametrize("command,flag", _ids(), ids=lambda x: x)
def test_valid_value_has_an_effect(runner, command, flag):
    case = _case(command, flag)
    base = runner(command, case.context, progress=case.progress, cached=True, main=case.main)
    assert base.rc == 0 or flag in ("--regression", "--scores"), (base.rc, base.err[-2000:])
    got = runner(command, case.context + case.valid, progress=case.progress, main=case.main)
    assert got.rc == 0, f"fastsel {command} {' '.join(case.valid)} failed: {got.err[-2000:]}"
    assert not got.errors() and "Traceback" not in got.err, got.err[-2000:]
    assert got.data or not got.main_file.name.endswith("json") or flag == "--out", "no output written"
    before, after = case.observe(base), case.observe(got)
    assert after != before, f"fastsel {command} {' '.join(case.valid)}: no effect seen ({after!r} either way)"


@pytest.mark.parametrize("command,flag", _ids(), ids=lambda x: x)
def test_bad_value_is_one_error_line(runner, command, flag):
    case = _case(command, flag)
    assert case.bad, f"{command} {flag}: give at least one out-of-range value"
    for bad in case.bad:
        got = runner(command, case.context + bad)
        errors = got.errors()
        assert got.rc == 2 and len(errors) == 1 and "Traceback" not in got.err, (
            f"fastsel {command} {' '.join(bad)}: rc={got.rc}, stderr: {got.err[-2000:]}")
        assert "internal error" not in errors[0], errors[0]
        assert not got.main_file.exists(), f"{got.main_file} written by a refused command"
        if "=" not in bad[0]:  # argparse names a switch given a value itself
            names = _names(command, flag, case) + _value(bad, runner)
            assert any(n in errors[0] for n in names), f"{errors[0]!r} does not name {flag}"


NEEDS = sorted(k for k, c in CASES.items() if c.needs)


@pytest.mark.parametrize("command,flag", NEEDS, ids=lambda x: x)
def test_flag_without_what_it_needs_is_refused(runner, command, flag):
    case = _case(command, flag)
    argv, needed = case.needs  # type: ignore[misc]
    got = runner(command, argv)
    errors = got.errors()
    assert got.rc == 2 and len(errors) == 1 and "Traceback" not in got.err, (
        f"fastsel {command} {' '.join(argv)} (without {needed}) was not refused: rc={got.rc}, stderr: {got.err[-1500:]}")
    assert flag in errors[0] and needed in errors[0], f"{errors[0]!r} should name {flag} and {needed}"
    assert not got.main_file.exists()


@pytest.mark.parametrize("flag", [["--tuner", "lora"], ["--scores", "{scores}"], ["--lora-r", "2"], ["--lora-alpha", "3"],
                                  ["--lora-dropout", "0.1"], ["--adapter-size", "4"], ["--fisher", "sampled"]], ids=lambda f: f[0])
def test_finetune_flags_a_plan_file_sets_are_refused_with_plan(runner, flag):
    """finetune --plan FILE: the plan file sets the tuning, so the flags that make a plan would be ignored."""
    got = runner("finetune", ["--plan", "{plan}", *flag])
    errors = got.errors()
    assert got.rc == 2 and len(errors) == 1 and flag[0] in errors[0] and "--strategy" in errors[0], got.err[-1500:]
    assert runner("finetune", ["--plan", "{plan}"], cached=True).rc == 0  # the plan alone runs


def test_strict_json_helper_refuses_nan():
    with pytest.raises(ValueError):
        _strict('{"a": NaN}')
    assert math.isfinite(_strict('{"a": 1.5}')["a"])
