"""Issue 24, no silent wrong answer: input that used to give a result that was not what was asked for (a tokenizer
of special tokens only, NaN scores, real-valued labels as 40 classes, flags that were ignored, outputs overwriting
each other, NaN written into JSON, a bad FASTSEL_BACKEND reported as fine) ends in a correct result or in one
``error:`` line (exit code 2) naming the flag or file and what to do.

Tiny models only (the module's tiny_dir); every refusal happens before any data is scored.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from fastsel.cli.app import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _error_line(capsys) -> str:
    """The one ``error:`` line of a refused command (and no traceback)."""
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _hidden(model_dir: str) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"]


def _scores_file(path: Path, *, layers: int = 3, names: str = "bert.encoder.layer.{}", **override) -> str:
    rows = [{"layer": l, "name": names.format(l), "score": float(l + 1)} for l in range(layers)]
    for l, value in override.items():
        rows[int(l[1:])]["score"] = value
    path.write_text(json.dumps({"metric": "fisher", "model": "tiny", "task": "sst2", "layers": rows}))
    return str(path)


# -- 1: a model folder without tokenizer files ----------------------------------------------------------


@pytest.fixture
def no_tokenizer_dir(tmp_path, tiny_dir) -> str:
    """tiny_dir with only its config and weights: what ``rm x/tokenizer* x/vocab.txt x/special_tokens_map.json``
    leaves; transformers then builds a tokenizer of the special tokens alone."""
    path = tmp_path / "no-tokenizer"
    path.mkdir()
    for f in Path(tiny_dir).iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors":
            shutil.copy(f, path / f.name)
    return str(path)


@pytest.mark.parametrize("metric", ["fisher", "cca"])  # the streamed pass (load_tokenizer) and the in-memory one (load_model)
def test_model_without_tokenizer_files_is_refused(tmp_path, capsys, no_tokenizer_dir, data_dir, metric):
    out = tmp_path / "s.json"
    rc = main(["score", "--model", no_tokenizer_dir, "--task", "sst2", "--data-dir", str(data_dir), "--metric", metric,
               "--num-examples", "8", "--max-length", "16", "--out", str(out), "--no-progress"])
    line = _error_line(capsys)
    assert rc == 2 and not out.exists()
    assert "[UNK]" in line and no_tokenizer_dir in line and "no tokenizer file" in line and "vocab.txt" in line


def test_load_model_checks_the_tokenizer(no_tokenizer_dir, tiny_dir):
    from fastsel.hf.loading import ModelLoadError, load_model, load_tokenizer

    with pytest.raises(ModelLoadError, match=r"knows \d+ tokens but the model's vocabulary has"):
        load_model(no_tokenizer_dir, num_labels=2)
    with pytest.raises(ModelLoadError, match="every word would be"):
        load_tokenizer(no_tokenizer_dir)
    assert len(load_tokenizer(tiny_dir)) > 100  # a model with its tokenizer loads as before


# -- 2: scores.json with NaN or string scores; scores of another model ------------------------------------


@pytest.mark.parametrize("bad,what", [(float("nan"), "not a finite number"), (float("inf"), "not a finite number"),
                                      ("0.5", "is not a number"), (None, "is not a number"), (True, "is not a number")])
def test_plan_refuses_scores_that_are_not_finite_numbers(tmp_path, capsys, tiny_dir, bad, what):
    scores = _scores_file(tmp_path / "scores.json", l1=bad)
    rc = main(["plan", "--model", tiny_dir, "--strategy", "fisher-top-2", "--scores", scores, "--out", str(tmp_path / "p.json")])
    line = _error_line(capsys)
    assert rc == 2 and scores in line and what in line and not (tmp_path / "p.json").exists()


def test_layer_scores_read_names_the_file(tmp_path):
    from fastsel.scores.layer_scores import LayerScores

    path = _scores_file(tmp_path / "s.json", l2=float("nan"))
    with pytest.raises(ValueError, match=r"s\.json: the score of layer\(s\) \[2\] is not a finite number"):
        LayerScores.read(path)
    assert [s.score for s in LayerScores.read(_scores_file(tmp_path / "ok.json")).layers] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("layers,names,what", [(4, "bert.encoder.layer.{}", "scores 4 blocks but"),
                                               (2, "bert.encoder.layer.{}", "scores 2 blocks but"),
                                               (3, "roberta.encoder.layer.{}", "'roberta.encoder.layer.0' there but")])
@pytest.mark.parametrize("command", ["plan", "finetune"])
def test_scores_of_another_model_are_refused(tmp_path, capsys, tiny_dir, data_dir, layers, names, what, command):
    scores = _scores_file(tmp_path / "other.json", layers=layers, names=names)
    if command == "plan":
        argv = ["plan", "--model", tiny_dir, "--strategy", "fisher-top-1", "--scores", scores]
    else:
        argv = ["finetune", "--model", tiny_dir, "--task", "sst2", "--data-dir", str(data_dir), "--strategy", "fisher-top-1",
                "--scores", scores, "--no-progress", "--out", str(tmp_path / "run")]
    rc = main(argv)
    line = _error_line(capsys)
    assert rc == 2 and "--scores" in line and scores in line and what in line
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("names", ["bert.encoder.layer.{}", "layer.{}"])  # full module names, or short ones
def test_scores_of_this_model_plan(tmp_path, capsys, tiny_dir, names):
    scores = _scores_file(tmp_path / "s.json", names=names)
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", tiny_dir, "--strategy", "fisher-top-1", "--scores", scores, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["details"]["layers"] == [2]


def test_plan_refuses_scores_a_strategy_does_not_use(tmp_path, capsys, tiny_dir):
    scores = _scores_file(tmp_path / "s.json")
    assert main(["plan", "--model", tiny_dir, "--strategy", "position-top-1", "--scores", scores]) == 2
    assert "--scores does not apply to strategy 'position-top-1'" in _error_line(capsys)
    assert main(["plan", "--model", tiny_dir, "--strategy", "fisher-top-1", "--scores", scores, "--out", scores]) == 2
    assert "would overwrite the scores" in _error_line(capsys)


# -- 3: real-valued labels in a custom file without --regression ------------------------------------------


@pytest.fixture
def real_labels_csv(tmp_path) -> Path:
    f = tmp_path / "sts.csv"
    f.write_text("text,y\n" + "".join(f"a sentence of the film number {i},{(i * 0.37) % 5:.2f}\n" for i in range(12)))
    return f


def test_real_labels_need_regression(tmp_path, capsys, tiny_dir, real_labels_csv):
    out = tmp_path / "s.json"
    argv = ["score", "--model", tiny_dir, "--task", "custom", "--data-file", str(real_labels_csv), "--text-fields", "text",
            "--label-field", "y", "--num-examples", "8", "--max-length", "16", "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "--regression" in line and str(real_labels_csv) in line and "'y'" in line and not out.exists()
    assert main(argv + ["--regression"]) == 0, capsys.readouterr().err  # with it: a regression task, scored
    assert json.loads(out.read_text())["num_examples"] == 8


def test_load_custom_examples_real_labels(tmp_path, real_labels_csv):
    from fastsel.data.readers import load_custom_examples

    with pytest.raises(ValueError, match="holds real numbers"):
        load_custom_examples(real_labels_csv, ["text"], "y")
    assert load_custom_examples(real_labels_csv, ["text"], "y", regression=True).task.is_regression
    ints = tmp_path / "ints.csv"  # integer classes (also as 0.0 / 1.0) and names stay classes
    ints.write_text("text,y\n" + "".join(f"s {i},{i % 3}\n" for i in range(9)))
    assert load_custom_examples(ints, ["text"], "y").task.num_labels == 3
    named = tmp_path / "named.csv"
    named.write_text("text,y\na,pos\nb,neg\nc,1.5\n")
    assert load_custom_examples(named, ["text"], "y").task.num_labels == 3


# -- 4: custom-data flags without --task custom ----------------------------------------------------------


@pytest.mark.parametrize("flag", [["--data-file", "F.csv"], ["--text-fields", "a,b"], ["--regression"], ["--label-field", "y"]])
def test_custom_data_flags_need_task_custom(tmp_path, capsys, data_dir, flag):
    rc = main(["score", "--task", "sst2", "--data-dir", str(data_dir), *flag, "--out", str(tmp_path / "s.json"), "--no-progress"])
    line = _error_line(capsys)
    assert rc == 2 and f"{flag[0]} applies only to --task custom" in line and not (tmp_path / "s.json").exists()


# -- 5: outputs that would overwrite each other ----------------------------------------------------------


@pytest.mark.parametrize("paths,flags", [
    (["--out", "r/x.png", "--plot", "r/x.png"], ("--plot", "--out")),
    (["--out", "r/x.json", "--checkpoint", "r/x.json"], ("--checkpoint", "--out")),
    (["--plot", "r/c.png", "--checkpoint", "r/c.png"], ("--checkpoint", "--plot")),
    (["--out", "r/s.json", "--plot", "r/s"], None),  # different files: --plot r/s is r/s.png
])
def test_colliding_outputs_are_refused(tmp_path, capsys, monkeypatch, tiny_dir, data_dir, paths, flags):
    monkeypatch.chdir(tmp_path)
    argv = ["score", "--model", tiny_dir, "--task", "sst2", "--data-dir", str(data_dir), "--num-examples", "8",
            "--max-length", "16", "--no-progress", *paths]
    if flags is None:
        assert main(argv) == 0, capsys.readouterr().err
        assert Path("r/s.png").read_bytes()[:4] == b"\x89PNG" and json.loads(Path("r/s.json").read_text())
        return
    assert main(argv) == 2
    line = _error_line(capsys)
    assert f"{flags[0]} " in line and f"same path as {flags[1]}" in line and not Path("r").exists()


def test_out_over_the_data_file_is_refused(tmp_path, capsys, real_labels_csv):
    rc = main(["score", "--task", "custom", "--data-file", str(real_labels_csv), "--text-fields", "text", "--regression",
               "--out", str(real_labels_csv)])
    assert rc == 2 and "same path as --data-file" in _error_line(capsys)


# -- 6: plan sizes, alpha, labels; strict JSON --------------------------------------------------------------


@pytest.mark.parametrize("args,what", [
    (["--strategy", "lora-i", "--lora-r", "1000000"], "--lora-r 1000000: the LoRA rank must be at most the model's hidden size"),
    (["--strategy", "spafit-0-1-ii", "--lora-r", "HIDDEN+1"], "--lora-r HIDDEN+1: the LoRA rank"),
    (["--strategy", "position-top-1", "--tuner", "lora", "--lora-r", "HIDDEN+1"], "the LoRA rank"),
    (["--strategy", "position-top-1", "--tuner", "adapter", "--adapter-size", "HIDDEN+1"], "--adapter-size HIDDEN+1: the adapter"),
    (["--strategy", "lora-i", "--lora-r", "2", "--lora-alpha", "nan"], "--lora-alpha) must be a finite number > 0, got nan"),
    (["--strategy", "lora-i", "--lora-r", "2", "--lora-alpha", "inf"], "finite number > 0, got inf"),
    (["--strategy", "lora-i", "--lora-r", "2", "--lora-alpha", "-1"], "finite number > 0"),
    (["--strategy", "full", "--num-labels", "0"], "--num-labels must be >= 1"),
    (["--strategy", "full", "--num-labels", "-2"], "--num-labels must be >= 1"),
])
def test_plan_bad_sizes_are_refused(tmp_path, capsys, tiny_dir, args, what):
    hidden = str(_hidden(tiny_dir) + 1)
    args = [a.replace("HIDDEN+1", hidden) for a in args]
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", tiny_dir, *args, "--out", str(out)]) == 2
    assert what.replace("HIDDEN+1", hidden) in _error_line(capsys) and not out.exists()


def test_plan_within_bounds_counts_sensibly(tmp_path, capsys, tiny_dir):
    hidden, out = _hidden(tiny_dir), tmp_path / "plan.json"
    assert main(["plan", "--model", tiny_dir, "--strategy", "lora-i", "--lora-r", str(hidden), "--lora-alpha", "16",
                 "--num-labels", "1", "--out", str(out)]) == 0
    plan = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in plan.json"))
    assert 0 < plan["trainable_params"] < plan["params_by_group"]["all_params"]
    assert plan["params_by_group"]["head"] == hidden + 1  # --num-labels 1: a regression head
    assert "%)" in capsys.readouterr().out


def test_json_writers_refuse_nan(tmp_path):
    from fastsel.plans.strategies import build_plan
    from fastsel.scores.layer_scores import LayerScore, LayerScores
    from fastsel.utils.atomic import atomic_write_json

    plan = build_plan("position-top-1", 3)
    plan.details["oops"] = [1.0, float("nan")]
    with pytest.raises(ValueError, match=r"plan\.json: not written, details\.oops\[1\] is not a finite number"):
        plan.to_json(tmp_path / "plan.json")
    scores = LayerScores("fisher", "m", "t", "train", 4, [LayerScore(l, f"layer.{l}", 1.0) for l in range(2)])
    scores.info["seconds"] = math.inf
    with pytest.raises(ValueError, match=r"s\.json: not written, seconds is not a finite number"):
        scores.to_json(tmp_path / "s.json")
    assert not list(tmp_path.iterdir())  # nothing written, no temporary file left
    atomic_write_json(tmp_path / "ok.json", {"a": [1.5, None]})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": [1.5, None]}


# -- 7: finetune values score refuses -----------------------------------------------------------------------


@pytest.mark.parametrize("args,what", [
    (["--max-length", "0"], "--max-length must be >= 2"), (["--max-length", "1"], "--max-length must be >= 2"),
    (["--score-examples", "-3"], "--score-examples must be >= 1"), (["--score-examples", "0"], "--score-examples must be >= 1"),
    (["--rank-examples", "-1"], "--rank-examples must be >= 1"),
    (["--rank-epochs", "5,-1", "--epochs", "3"], "epoch(s) [5, -1] outside 0..3"),
    (["--rank-epochs", "4", "--epochs", "3"], "epoch(s) [4] outside 0..3"),
    (["--strategy", "lora-i", "--tuner", "adapter"], "--tuner adapter does not apply to strategy 'lora-i'"),
    (["--strategy", "bitfit", "--tuner", "lora"], "--tuner lora does not apply to strategy 'bitfit'"),
    (["--strategy", "lora-ii", "--lora-r", "1000000"], "--lora-r 1000000: the LoRA rank must be at most"),
    (["--strategy", "position-top-1", "--scores", "s.json"], "--scores does not apply to strategy 'position-top-1'"),
])
def test_finetune_bad_values_are_refused_before_loading(tmp_path, capsys, monkeypatch, tiny_dir, data_dir, args, what):
    monkeypatch.chdir(tmp_path)
    argv = ["finetune", "--model", tiny_dir, "--task", "rte", "--data-dir", str(data_dir), "--no-progress", "--out", "run"]
    if "--strategy" not in args:
        argv += ["--strategy", "position-top-1"]
    assert main(argv + args) == 2
    assert what in _error_line(capsys) and not Path("run").exists()


def test_finetune_plan_file_sizes_are_checked(tmp_path, capsys, tiny_dir, data_dir):
    plan = tmp_path / "plan.json"
    assert main(["plan", "--model", tiny_dir, "--strategy", "lora-i", "--lora-r", "2", "--out", str(plan)]) == 0
    capsys.readouterr()
    data = json.loads(plan.read_text())
    for block in data["blocks"]:
        block["lora"]["r"] = 100000
    plan.write_text(json.dumps(data))
    rc = main(["finetune", "--model", tiny_dir, "--task", "rte", "--data-dir", str(data_dir), "--plan", str(plan),
               "--no-progress", "--out", str(tmp_path / "run")])
    line = _error_line(capsys)
    assert rc == 2 and f"--plan {plan}: its LoRA rank is 100000" in line and not (tmp_path / "run").exists()


def test_finetune_fisher_mode_is_checked_for_every_strategy(capsys, tiny_dir, data_dir):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--model", tiny_dir, "--task", "rte", "--data-dir", str(data_dir), "--strategy", "position-top-1",
              "--fisher", "bogus", "--out", "unused"])
    assert exc.value.code == 2 and "--fisher" in _error_line(capsys)


# -- 8: flags that only apply with another one ---------------------------------------------------------------


@pytest.mark.parametrize("flag,needs", [(["--stable-tau", "0.5"], "--until-stable"), (["--check-every", "64"], "--until-stable"),
                                        (["--stable-checks", "2"], "--until-stable"), (["--checkpoint-every", "8"], "--checkpoint")])
def test_flags_without_the_flag_they_need_are_refused(tmp_path, capsys, tiny_dir, data_dir, flag, needs):
    rc = main(["score", "--model", tiny_dir, "--task", "sst2", "--data-dir", str(data_dir), "--num-examples", "8",
               "--out", str(tmp_path / "s.json"), "--no-progress", *flag])
    line = _error_line(capsys)
    assert rc == 2 and f"{flag[0]} only applies with {needs}" in line and not (tmp_path / "s.json").exists()


def test_help_still_shows_the_defaults(capsys):
    from fastsel.pipeline.config import PipelineConfig

    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--stable-tau TAU", PipelineConfig.stable_tau), ("--check-every M", PipelineConfig.check_every_examples),
                          ("--stable-checks C", PipelineConfig.stable_checks),
                          ("--checkpoint-every M", PipelineConfig.checkpoint_every_examples)):
        entry = text[text.index(f"{flag} --"):][:160]  # "--stable-tau TAU --until-stable: target tau ..."
        assert f"(default: {default})" in entry and "(default: None)" not in entry, entry


def test_until_stable_flags_reach_the_pipeline(monkeypatch, tiny_dir, data_dir):
    """Given with --until-stable they are used; left out, PipelineConfig's defaults are."""
    import fastsel.cli.app as app

    seen = []
    monkeypatch.setattr(app, "score", lambda cfg, pcfg, **kw: seen.append(pcfg) or {})
    base = ["score", "--model", tiny_dir, "--task", "sst2", "--data-dir", str(data_dir), "--no-progress"]
    assert main(base + ["--until-stable", "--stable-tau", "0.5", "--check-every", "64", "--stable-checks", "2"]) == 0
    assert main(base + ["--checkpoint", str(Path(tiny_dir).parent / "ck"), "--checkpoint-every", "8"]) == 0
    assert main(base) == 0
    (a, b, c) = seen
    assert (a.until_stable, a.stable_tau, a.check_every_examples, a.stable_checks) == (True, 0.5, 64, 2)
    assert b.checkpoint_every_examples == 8
    from fastsel.pipeline.config import PipelineConfig

    assert (c.stable_tau, c.check_every_examples, c.stable_checks, c.checkpoint_every_examples) == (
        PipelineConfig.stable_tau, PipelineConfig.check_every_examples, PipelineConfig.stable_checks,
        PipelineConfig.checkpoint_every_examples)


def test_plan_tuner_that_a_strategy_ignores_is_refused(capsys, tiny_dir):
    assert main(["plan", "--model", tiny_dir, "--strategy", "spafit-0-1-i", "--tuner", "adapter"]) == 2
    assert "--tuner adapter does not apply to strategy 'spafit-0-1-i'" in _error_line(capsys)


# -- 9: FASTSEL_BACKEND ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,what", [("bogus", "unknown backend 'bogus'"), ("nosuchop=bmm", "unknown op 'nosuchop'"),
                                        ("accumulate_linear_sq_grad=fast", "unknown backend 'fast'")])
def test_bad_backend_env_is_an_error(tmp_path, capsys, monkeypatch, tiny_dir, data_dir, value, what):
    from fastsel.ops import backend

    monkeypatch.setenv(backend.BACKEND_ENV, value)
    assert main(["info"]) == 2
    cap = capsys.readouterr()
    lines = [l for l in cap.err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and f"FASTSEL_BACKEND={value}" in lines[0] and what in lines[0]
    assert "accumulate_linear_sq_grad" in cap.out  # the report itself is still printed
    out = tmp_path / "s.json"
    assert main(["score", "--model", tiny_dir, "--task", "sst2", "--data-dir", str(data_dir), "--num-examples", "8",
                 "--out", str(out), "--no-progress"]) == 2
    assert what in _error_line(capsys) and not out.exists()
    assert backend.env_problem() is not None
    monkeypatch.setenv(backend.BACKEND_ENV, "accumulate_linear_sq_grad=bmm")
    assert backend.env_problem() is None and main(["info"]) == 0


# -- 10: --plot without a suffix ------------------------------------------------------------------------------


def test_plot_without_suffix_reports_the_file_written(tmp_path, capsys, tiny_dir, data_dir):
    plot = tmp_path / "p"
    rc = main(["score", "--model", tiny_dir, "--task", "sst2", "--data-dir", str(data_dir), "--num-examples", "8",
               "--max-length", "16", "--plot", str(plot), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and f"wrote {plot}.png" in out.splitlines()
    assert Path(f"{plot}.png").read_bytes()[:4] == b"\x89PNG" and not plot.exists()


def test_plot_in_a_format_matplotlib_cannot_write_is_refused_up_front(tmp_path, capsys, data_dir):
    rc = main(["score", "--task", "sst2", "--data-dir", str(data_dir), "--plot", str(tmp_path / "p.json"), "--no-progress"])
    assert rc == 2 and "matplotlib cannot write .json files" in _error_line(capsys)
