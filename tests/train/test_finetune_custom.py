"""fastsel finetune on custom CSV/JSONL data, like fastsel score --task custom (issue 24)."""
from __future__ import annotations

import json

import pytest

from fastsel.cli.app import main
from fastsel.train.config import TrainConfig
from fastsel.train.finetune import EVAL_SHARE, FinetuneJob, job_examples

ROWS = [("a good film", "pos"), ("bad and dull", "neg"), ("a great cast", "pos"), ("boring story", "neg"),
        ("fine and fresh", "pos"), ("slow and thin", "neg")]


@pytest.fixture
def files(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"{t} {i},{y}\n" for i in range(5) for t, y in ROWS))  # 30 rows
    dev = tmp_path / "dev.jsonl"  # other format, one class only: keeps the training file's class indices
    dev.write_text("".join(json.dumps({"text": f"dull {i}", "label": "neg"}) + "\n" for i in range(4)))
    return train, dev


def _job(path, **kw) -> FinetuneJob:
    return FinetuneJob(model="unused", task="custom", out="unused", data_file=str(path), text_fields=("text",),
                       strategy="full", **kw)


def test_held_out_share_is_disjoint_seeded_and_complete(files):
    train, _ = files
    spec, tr, ev, source = job_examples(_job(train))
    assert spec.label_names == ("neg", "pos") and len(ev) == round(EVAL_SHARE * 30) == 3 and len(tr) == 27
    rows = {(t, y) for t, y in zip(tr.text_a + ev.text_a, tr.labels + ev.labels)}
    assert len(rows) == 30 and not set(tr.text_a) & set(ev.text_a)  # every row once, none in both
    assert "3 of the 30 examples" in source and "held out" in source
    assert job_examples(_job(train))[2].text_a == ev.text_a  # seeded
    assert job_examples(_job(train, train=TrainConfig(seed=1)))[2].text_a != ev.text_a


def test_eval_file_keeps_the_training_classes(files):
    train, dev = files
    spec, tr, ev, source = job_examples(_job(train, eval_file=str(dev)))
    assert len(tr) == 30 and len(ev) == 4 and ev.labels == [0, 0, 0, 0] and ev.task.label_names == ("neg", "pos")
    assert source == str(dev.resolve())


def test_eval_file_with_an_unknown_label_is_refused(files, tmp_path):
    train, _ = files
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nok,pos\nwhat,maybe\n")
    with pytest.raises(ValueError, match="maybe"):
        job_examples(_job(train, eval_file=str(bad)))


def test_custom_flags_need_task_custom(files):
    train, _ = files
    with pytest.raises(ValueError, match="--data-file applies only to --task custom"):
        FinetuneJob(model="m", task="sst2", out="o", data_file=str(train), strategy="full")


def test_eval_file_that_is_the_data_file_is_refused(files):
    train, _ = files
    with pytest.raises(ValueError, match="--eval-file .* is the --data-file"):
        _job(train, eval_file=str(train))  # refused when the job is made


def _argv(tiny_dir, train, out, *extra):
    return ["finetune", "--model", str(tiny_dir), "--task", "custom", "--data-file", str(train), "--text-fields", "text",
            "--strategy", "position-top-1", "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--no-progress",
            "--out", str(out), *extra]


def test_finetune_custom_csv_end_to_end(files, tiny_dir, tmp_path, capsys):
    train, dev = files
    out = tmp_path / "run"
    assert main(_argv(tiny_dir, train, out, "--eval-file", str(dev))) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "custom" and res["num_train"] == 30 and res["num_eval"] == 4
    assert res["main_metric"] == "accuracy" and res["eval_source"] == str(dev.resolve())
    assert res["job"]["data_file"] == str(train) and res["job"]["text_fields"] == ["text"]


def test_finetune_custom_regression(tmp_path, tiny_dir, capsys):
    data = tmp_path / "r.jsonl"
    data.write_text("".join(json.dumps({"a": f"x {i}", "b": f"y {i}", "score": i / 7}) + "\n" for i in range(20)))
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(tiny_dir), "--task", "custom", "--data-file", str(data), "--text-fields", "a,b",
            "--label-field", "score", "--regression", "--strategy", "position-top-1", "--epochs", "1", "--max-length",
            "16", "--no-progress", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["main_metric"] == "pearson" and res["num_train"] == 18 and res["num_eval"] == 2


def test_finetune_custom_without_text_fields_is_one_line(files, tiny_dir, tmp_path, capsys):
    train, _ = files
    argv = ["finetune", "--model", str(tiny_dir), "--task", "custom", "--data-file", str(train), "--strategy",
            "position-top-1", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "--text-fields" in err[0]
