"""Issue 24 leftovers: --no-progress silences every bar, --confidence-groups is bounded, Python-API scores carry
their task and split, the plot's top-k label is in rank order, --help groups shared metric flags under every metric
and shows every default. Tiny models (tiny_dir), a few examples."""
from __future__ import annotations

import argparse
import re

import pytest

from fastsel.cli.app import build_parser, main
from fastsel.scores.layer_scores import LayerScore, LayerScores

pytestmark = pytest.mark.usefixtures("one_thread")


def _score_argv(tiny_dir, data_dir, tmp_path, *extra: str) -> list[str]:
    return ["score", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--num-examples", "8",
            "--max-length", "16", "--out", str(tmp_path / "s.json"), *extra]


def _errors(err: str) -> list[str]:
    return [l for l in err.splitlines() if l.startswith("error:")]


# -- 1: --no-progress silences transformers' and datasets' bars too ---------------------------------------------


def test_no_progress_silences_every_bar(tiny_dir, data_dir, tmp_path, cache, capfd):
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    assert main(_score_argv(tiny_dir, data_dir, tmp_path, "--no-progress")) == 0  # a fresh cache: it tokenises
    err = capfd.readouterr().err
    assert "%|" not in err and "Loading weights" not in err and "tokenising" not in err, err
    assert hf_logging.is_progress_bar_enabled() == before  # the setting is restored after the command


def test_api_progress_false_silences_loading_bar(tiny_dir, data_dir, cache, capfd):
    from fastsel.pipeline.config import ScoreConfig
    from fastsel.pipeline.run import score

    cfg = ScoreConfig(metric="fisher", model=str(tiny_dir), task="sst2", data_dir=str(data_dir), num_examples=8,
                      max_length=16)
    score(cfg, progress=False)
    err = capfd.readouterr().err
    assert "%|" not in err and "Loading weights" not in err, err


# -- 2: --confidence-groups is bounded ----------------------------------------------------------------------------


def test_confidence_groups_above_the_examples_is_one_line(tiny_dir, data_dir, tmp_path, cache, capsys):
    assert main(_score_argv(tiny_dir, data_dir, tmp_path, "--no-progress", "--confidence-groups", "9")) == 2
    err = capsys.readouterr().err
    assert len(_errors(err)) == 1 and err.strip() == _errors(err)[0], err
    assert "--confidence-groups 9" in err and "8 examples" in err
    assert not (tmp_path / "s.json").exists()


def test_confidence_groups_above_the_memory_is_one_line(tiny_dir, data_dir, tmp_path, cache, capsys, monkeypatch):
    from fastsel.pipeline import streamed

    monkeypatch.setattr(streamed, "available_memory", lambda device: 400_000)  # 400 kB free: 200 kB for accumulators
    assert main(_score_argv(tiny_dir, data_dir, tmp_path, "--no-progress", "--confidence-groups", "8")) == 2
    err = capsys.readouterr().err
    assert len(_errors(err)) == 1 and err.strip() == _errors(err)[0], err
    assert "--confidence-groups 8" in err and "float32 parameters" in err and re.search(r"about [\d.]+ [KMG]?B", err)
    assert not (tmp_path / "s.json").exists()
    # variability alone keeps no per-parameter accumulators: the Fisher estimate does not apply to it
    assert main(_score_argv(tiny_dir, data_dir, tmp_path, "--no-progress", "--metric", "variability",
                            "--confidence-groups", "2")) == 0


# -- 3: scores from the Python API carry their task and split -----------------------------------------------------


def test_api_scores_carry_task_and_split(tiny_dir, data_dir, cache):
    from fastsel.pipeline.config import ScoreConfig
    from fastsel.pipeline.run import score

    cfg = ScoreConfig(metric="fisher", model=str(tiny_dir), task="rte", split="validation", data_dir=str(data_dir),
                      num_examples=8, max_length=16, confidence_groups=0)
    scores = score(cfg, progress=False)["fisher"]
    assert (scores.task, scores.split) == ("rte", "validation")
    assert " on rte/validation," in scores.table().splitlines()[0]


def test_fisher_layer_scores_table_header(tiny_dir):
    import torch

    from fastsel.hf.loading import load_model
    from fastsel.scores.fisher import fisher_layer_scores

    model, tok, _ = load_model(str(tiny_dir), num_labels=2)
    enc = tok(["a good film", "a dull one"], return_tensors="pt", padding=True)
    batch = {**enc, "labels": torch.tensor([1, 0])}
    given, _ = fisher_layer_scores(model, [batch], task="sst2", split="train")
    assert " on sst2/train," in given.table().splitlines()[0]
    bare, _ = fisher_layer_scores(model, [batch])
    assert " on " not in bare.table().splitlines()[0]  # no "on /" when no task is known


# -- 4: the plot's top-k label is in rank order -------------------------------------------------------------------


def test_top_label_is_best_first():
    from fastsel.scores.plot import top_label

    scores = LayerScores("fisher", "m", "sst2", "train", 8,
                         [LayerScore(layer=l, name=f"layer.{l}", score=s) for l, s in enumerate([0.2, 0.1, 0.9, 0.5])])
    assert top_label(scores, 3) == "top-3: [2, 3, 0]"
    lower = LayerScores("variability", "m", "sst2", "train", 8, scores.layers, higher_is_better=False)
    assert top_label(lower, 3) == "top-3: [1, 0, 3]"


# -- 5, 6: --help ---------------------------------------------------------------------------------------------------


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_help_groups_shared_metric_flags_under_every_metric():
    p = _subparsers()["score"]
    title = {a.dest: g.title for g in p._action_groups for a in g._group_actions}
    for dest in ("probe", "pooling", "probe_c", "probe_eval_examples"):
        assert "variability" in title[dest] and "cca" in title[dest], (dest, title[dest])
    assert title["variant"] == "--metric variability" and title["cca_folds"] == "--metric cca"
    text = p.format_help()
    header = [l for l in text.splitlines()[: text.splitlines().index(next(l for l in text.splitlines()
                                                                          if l.startswith("  --probe ")))]
              if l.startswith("--metric")][-1]
    assert "variability" in header, header


def test_help_shows_every_default():
    missing = []
    for cmd in ("score", "plan", "finetune"):
        p = _subparsers()[cmd]
        fmt = p._get_formatter()
        for a in p._actions:
            if not a.option_strings or a.default in (None, argparse.SUPPRESS) or isinstance(a, argparse._HelpAction):
                continue
            text = fmt._expand_help(a) if a.help and a.help.strip() else ""
            if "(default:" not in text:
                missing.append(f"{cmd} {a.option_strings[0]}")
    assert not missing, missing
    assert "(default: 16)" in " ".join(_subparsers()["finetune"].format_help().split())
