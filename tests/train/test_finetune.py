"""fastsel finetune end to end: the real model, checkpoints, SIGKILL and --resume, one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

from fastsel.data.features import PadCollator
from fastsel.train.finetune import FinetuneJob, run_finetune
from tests.cli_helpers import kill_when

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# -- the CLI on the real model and data (slow) ----------------------------------------------------------


@pytest.mark.slow
def test_finetune_cli_on_minilm(tmp_path, data_dir, minilm_path, capsys):
    from fastsel.cli.app import main

    out = tmp_path / "run"
    rc = main(["finetune", "--model", str(minilm_path), "--task", "rte", "--data-dir", str(data_dir), "--strategy",
               "fisher-top-1", "--train-examples", "32", "--eval-examples", "32", "--epochs", "1", "--max-length", "48",
               "--score-examples", "16", "--lr", "1e-4", "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["trainable_params"] == json.loads((out / "plan.json").read_text())["trainable_params"]
    assert res["cache"]["blocks"] >= 0 and (out / "curve.png").is_file() and (out / "scores.json").is_file()
    assert len(res["history"]) == 1 and 0 <= res["best"]["metrics"]["accuracy"] <= 1
    # a strategy whose metric is missing gives a clear error when no scores are passed
    from fastsel.pipeline.registry import METRICS

    if "variability" not in METRICS:
        rc = main(["finetune", "--model", str(minilm_path), "--task", "rte", "--data-dir", str(data_dir), "--strategy",
                   "lstar-up", "--train-examples", "8", "--epochs", "1", "--out", str(tmp_path / "r2"), "--no-progress"])
        assert rc == 2 and "no 'variability' metric is registered" in capsys.readouterr().err


# -- fastsel finetune: checkpoints, SIGKILL, --resume (issue 15) ---------------------------------------


def _ft_state(path):
    import torch

    s = torch.load(path, map_location="cpu", weights_only=False)
    return s["epoch"], s["batch"], s["step"]


@pytest.fixture(scope="module")
def ft_setup(tmp_path_factory):
    """A tiny random BERT with the tiny WordPiece tokenizer (no MiniLM needed), and the environment of a subprocess."""
    import os
    from pathlib import Path

    from tiny_tokenizer import save_tiny_bert

    repo = Path(__file__).resolve().parents[2]
    model = save_tiny_bert(tmp_path_factory.mktemp("ft-tiny") / "model")
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return model, env


def _ft_cmd(model, data_dir, out, *extra):
    import sys

    return [sys.executable, "-m", "fastsel", "finetune", "--model", model, "--task", "rte", "--data-dir", str(data_dir),
            "--strategy", "top-2", "--train-examples", "32", "--eval-examples", "8", "--epochs", "2", "--batch-size", "4",
            "--max-length", "24", "--lr", "1e-3", "--no-progress", "--out", str(out), *extra]


def test_finetune_sigkill_and_resume_is_bit_identical(tmp_path, ft_setup, data_dir):
    import signal
    import subprocess

    model, env = ft_setup
    ref = tmp_path / "ref"
    subprocess.run(_ft_cmd(model, data_dir, ref), env=env, check=True, capture_output=True)

    out = tmp_path / "run"
    args = _ft_cmd(model, data_dir, out, "--checkpoint-every", "1")
    state = out / "train-state.pt"
    kills = []
    for target in (2, 11):  # mid epoch 1, then mid epoch 2 of the resumed run
        proc = subprocess.Popen(args + (["--resume"] if kills else []), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        rc = kill_when(proc, lambda: state.exists() and _ft_state(state)[2] >= target)
        assert rc == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        kills.append(_ft_state(state))
        assert not (out / "results.json").exists()
    assert kills[0][2] >= 2 and kills[1][2] > kills[0][2]
    done = subprocess.run(args + ["--resume", "--keep-checkpoints"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming training at epoch" in done.stderr
    assert (out / "train-state.pt").is_file()  # kept for the check below (a finished run's is removed without the flag)
    from safetensors.torch import load_file

    got, want = load_file(out / "trained.safetensors"), load_file(ref / "trained.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)  # bit for bit
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref, out))
    for r in (a, b):
        for h in r["history"]:
            h.pop("train_seconds"), h.pop("eval_seconds")
    assert a["history"] == b["history"] and a["best"] == b["best"]

    # other settings: refused in one line
    bad = subprocess.run(_ft_cmd(model, data_dir, out, "--resume", "--lr", "2e-3"), env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "other settings" in bad.stderr and "lr" in bad.stderr and "Traceback" not in bad.stderr


def test_finetune_nan_loss_is_one_line(tmp_path, ft_setup, data_dir, capsys):
    from pathlib import Path

    from transformers import BertForSequenceClassification

    from fastsel.cli.app import main

    model, _ = ft_setup
    broken = tmp_path / "broken"
    m = BertForSequenceClassification.from_pretrained(model)
    with torch.no_grad():
        m.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    m.save_pretrained(broken)
    for f in Path(model).iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            (broken / f.name).write_bytes(f.read_bytes())
    rc = main(["finetune", "--model", str(broken), "--task", "rte", "--data-dir", str(data_dir), "--strategy", "full",
               "--train-examples", "8", "--eval-examples", "4", "--epochs", "1", "--batch-size", "4", "--max-length", "16",
               "--no-progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "training loss is nan" in err and "encoder.layer.0.output.dense.weight" in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_finetune_clamps_max_length(tmp_path, ft_setup, data_dir, capsys):
    from fastsel.cli.app import main

    model, _ = ft_setup
    rc = main(["finetune", "--model", model, "--task", "rte", "--data-dir", str(data_dir), "--strategy", "top-1",
               "--train-examples", "8", "--eval-examples", "4", "--epochs", "1", "--batch-size", "4",
               "--max-length", "5000", "--no-progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert sum("--max-length 5000" in l for l in err.splitlines()) == 1
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["max_length_limit"] == 128 and r["job"]["max_length"] == 128


def test_finetune_zero_examples_is_one_line(tmp_path, tiny_dir, data_dir, capsys):
    from fastsel.cli.app import main

    for flag in ("--train-examples", "--eval-examples"):
        code = main(["finetune", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--strategy", "full",
                     flag, "0", "--no-progress", "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert code == 2 and f"{flag} must be >= 1" in err and "Traceback" not in err


def test_finetune_rank_split_both_measures_held_out_examples(tmp_path, tiny_dir, data_dir):
    from fastsel.cli.app import main
    from fastsel.data.features import tokenize_examples
    from fastsel.data.readers import load_examples
    from fastsel.data.specs import get_task
    from fastsel.hf.loading import load_model
    from fastsel.scores.fisher import fisher_layer_scores

    out = tmp_path / "run"
    code = main(["finetune", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--strategy", "full",
                 "--train-examples", "16", "--eval-examples", "12", "--epochs", "1", "--batch-size", "8", "--max-length", "24",
                 "--rank-epochs", "1", "--rank-examples", "8", "--rank-split", "both", "--no-progress", "--out", str(out)])
    assert code == 0
    cbs = json.loads((out / "results.json").read_text())["callbacks"]
    assert set(cbs) == {"rank_stability", "rank_stability_heldout"}
    for rep in cbs.values():
        assert set(rep["epochs"]) == {"0", "1"} and "kendall_tau" in rep["epochs"]["1"]
    # epoch 0 of the held-out passes: the Fisher scores of the fresh model on the first 8 validation examples
    model, tok, _ = load_model(str(tiny_dir), num_labels=2, seed=0)
    ev = tokenize_examples(load_examples(get_task("sst2"), str(data_dir), "validation", num_examples=12, seed=0), tok, 24)
    scores, _ = fisher_layer_scores(model, [PadCollator(tok)(ev[:8])], progress=False)
    torch.testing.assert_close(torch.tensor(cbs["rank_stability_heldout"]["epochs"]["0"]["scores"]),
                               torch.tensor([s.score for s in scores.layers]), rtol=1e-4, atol=1e-12)
    assert cbs["rank_stability_heldout"]["epochs"]["0"]["scores"] != cbs["rank_stability"]["epochs"]["0"]["scores"]


def test_finetune_rank_split_bad_value_is_one_line(tmp_path, tiny_dir, data_dir, capsys):
    from fastsel.cli.app import main

    with pytest.raises(SystemExit) as exit_:  # argparse's choices
        main(["finetune", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--strategy", "full",
              "--rank-split", "test", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--rank-split" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="--rank-split must be one of"):  # the API checks it too
        run_finetune(FinetuneJob(model=str(tiny_dir), task="sst2", out=str(tmp_path / "run"), strategy="full",
                                 rank_split="test"))
