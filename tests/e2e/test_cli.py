"""The fastsel command line end to end: score (Fisher) on real data files, info, and clear errors."""
from __future__ import annotations

import json

import pytest

from fastsel.cli.app import main


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_dir):
    """A tiny random BERT with the tiny WordPiece tokenizer (conftest.tiny_dir): no MiniLM needed."""
    return str(tiny_dir)


@pytest.mark.parametrize("task,mode", [("sst2", "empirical"), ("rte", "exact"), ("stsb", "sampled"), ("boolq", "empirical")])
def test_score_fisher_writes_schema_and_plot(tmp_path, capsys, tiny_model_dir, data_dir, task, mode):
    out, plot = tmp_path / "scores.json", tmp_path / "scores.png"
    rc = main(["score", "--metric", "fisher", "--model", tiny_model_dir, "--task", task, "--data-dir", str(data_dir),
               "--num-examples", "12", "--batch-size", "5", "--fisher", mode, "--max-length", "32",
               "--out", str(out), "--plot", str(plot), "--no-progress"])
    assert rc == 0
    d = json.loads(out.read_text())
    for key in ("metric", "model", "task", "split", "num_examples", "mode", "layers", "ranking", "extra"):
        assert key in d
    assert d["metric"] == "fisher" and d["mode"] == mode and d["num_examples"] == 12
    assert [x["layer"] for x in d["layers"]] == [0, 1, 2]
    assert all({"layer", "name", "num_params", "score", "trace"} <= set(x) for x in d["layers"])
    assert sorted(d["ranking"]) == [0, 1, 2] and {"embeddings", "head"} <= set(d["extra"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ranking (best first)" in capsys.readouterr().out


def test_info(capsys):
    assert main(["info"]) == 0
    assert "accumulate_linear_sq_grad" in capsys.readouterr().out
    assert main(["info", "--json"]) == 0
    assert "ops" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "nosuchtask"], "unknown task"),
        (["--fisher", "empirical", "--num-examples", "0"], "num_examples must be"),
        (["--model", "/nonexistent/model/dir"], "could not load model"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, data_dir, args, message):
    rc = main(["score", "--data-dir", str(data_dir), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err.lower() and "Traceback" not in err


def test_missing_data_dir_is_explained(capsys, tmp_path, tiny_model_dir):
    rc = main(["score", "--model", tiny_model_dir, "--task", "sst2", "--data-dir", str(tmp_path), "--no-progress"])
    assert rc == 2 and str(tmp_path) in capsys.readouterr().err


def test_custom_csv(tmp_path, tiny_model_dir):
    f = tmp_path / "d.csv"
    f.write_text("txt,y\n" + "".join(f"sentence number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(10)))
    out = tmp_path / "s.json"
    assert main(["score", "--model", tiny_model_dir, "--task", "custom", "--data-file", str(f), "--text-fields", "txt",
                 "--label-field", "y", "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["num_examples"] == 10


@pytest.mark.slow
def test_real_minilm_sst2(tmp_path, data_dir):
    out = tmp_path / "s.json"
    assert main(["score", "--model", "minilm", "--task", "sst2", "--data-dir", str(data_dir), "--num-examples", "32",
                 "--out", str(out), "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert len(d["layers"]) == 6 and all(x["score"] > 0 for x in d["layers"])
