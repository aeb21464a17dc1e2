"""Issue 24 items 3 and 4: broken files, messages that do not say what to do, files and signals, checkpoints of a
finished run. Each case ends in a correct result or in one ``error:`` line (exit code 2) naming the flag or the file
and what to do -- never "internal error, please report it", never the words of safetensors, pickle, miniz or json.

Tiny models only (tiny_dir), a few examples each.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch

from fastsel.cli.app import main
from fastsel.pipeline.checkpoint import load_checkpoint, rank_file

pytestmark = pytest.mark.usefixtures("one_thread")

RAW = ("internal error", "please report", "miniz", "invalid load key", "Ran out of input", "inline_container")


def _error_line(capsys) -> str:
    """The one ``error:`` line of a refused command: in fastsel's words (the readers' own at most as a detail)."""
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: fastsel: ") and not any(raw in lines[0] for raw in RAW), lines[0]
    return lines[0]


def _score(model, data_dir, *extra, n=8):
    return ["score", "--model", str(model), "--task", "sst2", "--data-dir", str(data_dir), "--num-examples", str(n),
            "--batch-size", "4", "--max-length", "16", "--no-progress", *extra]


def _finetune(model, data_dir, out, *extra, strategy=("--strategy", "position-top-1")):
    return ["finetune", "--model", str(model), "--task", "rte", "--data-dir", str(data_dir), *strategy, "--train-examples",
            "8", "--eval-examples", "8", "--epochs", "1", "--batch-size", "4", "--max-length", "16", "--score-examples", "4",
            "--no-progress", "--out", str(out), *extra]


def _copy_model(tiny_dir, dest: Path) -> Path:
    shutil.copytree(tiny_dir, dest)
    return dest


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- 1: broken files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["fisher", "cca"])  # the streamed pass and the in-memory one
def test_truncated_model_weights(tmp_path, capsys, tiny_dir, data_dir, metric):
    model = _copy_model(tiny_dir, tmp_path / "m")
    _truncate(model / "model.safetensors")
    out = tmp_path / "s.json"
    assert main(_score(model, data_dir, "--metric", metric, "--out", str(out))) == 2
    line = _error_line(capsys)
    assert f"--model {model}" in line and str(model / "model.safetensors") in line
    assert "truncated or damaged" in line and "download or save the model again" in line and not out.exists()


def test_truncated_model_weights_finetune(tmp_path, capsys, tiny_dir, data_dir):
    model = _copy_model(tiny_dir, tmp_path / "m")
    _truncate(model / "model.safetensors", 0.1)
    assert main(_finetune(model, data_dir, tmp_path / "run")) == 2
    line = _error_line(capsys)
    assert str(model / "model.safetensors") in line and "truncated or damaged" in line
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("content,why", [("random", "not a torch checkpoint"), ("empty", "empty"),
                                         ("truncated", "truncated or damaged")])
def test_broken_score_checkpoint(tmp_path, capsys, tiny_dir, data_dir, content, why):
    ckdir, out = tmp_path / "ck", tmp_path / "s.json"
    argv = _score(tiny_dir, data_dir, "--checkpoint", str(ckdir), "--checkpoint-every", "4", "--out", str(out))
    assert main(argv + ["--keep-checkpoints"]) == 0, capsys.readouterr().err
    out.unlink()
    capsys.readouterr()
    f = rank_file(ckdir, 0, 1)
    if content == "random":
        f.write_bytes(random.Random(3000).randbytes(3000))  # seeded: the same bytes on every run
    elif content == "empty":
        f.write_bytes(b"")
    else:
        _truncate(f)
    assert main(argv + ["--resume"]) == 2
    line = _error_line(capsys)
    assert f"--checkpoint file {f}" in line and why in line and "delete it and rerun" in line and not out.exists()
    f.unlink()  # what the line says to do
    assert main(argv + ["--resume"]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["num_examples"] == 8


def test_score_checkpoint_of_another_kind_is_named(tmp_path, capsys, tiny_dir, data_dir):
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    torch.save({"weights": torch.zeros(3)}, rank_file(ckdir, 0, 1))  # a torch file, not a fastsel checkpoint
    assert main(_score(tiny_dir, data_dir, "--checkpoint", str(ckdir), "--resume")) == 2
    line = _error_line(capsys)
    assert str(rank_file(ckdir, 0, 1)) in line and "not a fastsel checkpoint" in line and "delete it" in line


def test_truncated_train_state(tmp_path, capsys, tiny_dir, data_dir):
    run = tmp_path / "run"
    assert main(_finetune(tiny_dir, data_dir, run, "--keep-checkpoints")) == 0, capsys.readouterr().err
    capsys.readouterr()
    _truncate(run / "train-state.pt")
    assert main(_finetune(tiny_dir, data_dir, run, "--resume")) == 2
    line = _error_line(capsys)
    assert str(run / "train-state.pt") in line and "truncated or damaged" in line
    assert "delete it and rerun without --resume" in line


def test_truncated_plan_and_scores(tmp_path, capsys, tiny_dir, data_dir):
    plan = tmp_path / "plan.json"
    assert main(["plan", "--model", tiny_dir, "--strategy", "position-top-1", "--out", str(plan)]) == 0
    capsys.readouterr()
    _truncate(plan)
    assert main(_finetune(tiny_dir, data_dir, tmp_path / "run", strategy=("--plan", str(plan)))) == 2
    line = _error_line(capsys)
    assert f"--plan {plan} is not valid JSON" in line and "fastsel plan --out" in line
    assert not (tmp_path / "run").exists()
    scores = tmp_path / "s.json"
    scores.write_text('{"metric": "fisher", "layers": [')
    assert main(["plan", "--model", tiny_dir, "--strategy", "fisher-top-1", "--scores", str(scores)]) == 2
    line = _error_line(capsys)
    assert f"--scores {scores}" in line and "malformed JSON" in line and "fastsel score --out" in line


# -- 2: messages that say what to do ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tiny_dir) -> str:
    from transformers import AutoTokenizer, T5Config, T5ForSequenceClassification

    path = tmp_path_factory.mktemp("t5") / "t5"
    vocab = json.loads((Path(tiny_dir) / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    T5ForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("command", ["score", "score-cca", "plan", "finetune"])
def test_encoder_decoder_is_named(tmp_path, capsys, t5_dir, data_dir, command):
    argv = {"score": _score(t5_dir, data_dir), "score-cca": _score(t5_dir, data_dir, "--metric", "cca"),
            "plan": ["plan", "--model", t5_dir, "--strategy", "full"],
            "finetune": _finetune(t5_dir, data_dir, tmp_path / "run")}[command]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert f"{t5_dir} is an encoder-decoder (t5); fastsel scores encoder classifiers (BERT, RoBERTa, ...)" in line
    assert "<eos>" not in line


@pytest.mark.parametrize("keep", [[], ["config.json"], ["model.safetensors"]])
def test_model_folder_without_config_or_weights(tmp_path, capsys, tiny_dir, data_dir, keep):
    model = tmp_path / "m"
    model.mkdir()
    for name in keep:
        shutil.copy(Path(tiny_dir) / name, model / name)
    assert main(_score(model, data_dir)) == 2
    line = _error_line(capsys)
    assert f"--model {model}: the folder has no" in line and "sentencepiece" not in line
    missing = line.split("the folder has no ", 1)[1].split(";", 1)[0]  # "config.json and no weights (...)"
    assert ("config.json" in missing) == ("config.json" not in keep)
    assert ("model.safetensors" in missing) == ("model.safetensors" not in keep)
    assert "save_pretrained" in line


def test_plan_needs_only_the_config(tmp_path, capsys, tiny_dir):
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(Path(tiny_dir) / "config.json", model / "config.json")
    assert main(["plan", "--model", str(model), "--strategy", "full"]) == 0, capsys.readouterr().err
    (model / "config.json").unlink()
    assert main(["plan", "--model", str(model), "--strategy", "full"]) == 2
    assert "the folder has no config.json" in _error_line(capsys)


@pytest.mark.parametrize("args,what", [
    (["--metric", "variability", "--probe", "--probe-c", "0"], "--probe-c must be a finite number > 0"),
    (["--metric", "probe", "--probe-c", "-1"], "--probe-c must be a finite number > 0"),
    (["--metric", "cca", "--cca-folds", "1"], "--cca-folds must be an integer >= 2"),
    (["--metric", "cca", "--cca-folds", "0"], "--cca-folds must be an integer >= 2"),
])
def test_metric_flags_are_named_with_their_range(tmp_path, capsys, tiny_dir, data_dir, args, what):
    out = tmp_path / "s.json"
    assert main(_score(tiny_dir, data_dir, *args, "--out", str(out))) == 2
    line = _error_line(capsys)
    assert what in line and "LogisticRegression" not in line and "n_splits" not in line and not out.exists()


def test_finetune_negative_seed(tmp_path, capsys, tiny_dir, data_dir):
    assert main(_finetune(tiny_dir, data_dir, tmp_path / "run", "--seed", "-1")) == 2
    line = _error_line(capsys)
    assert "(--seed) must be in 0..4294967295, got -1" in line and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["score", "finetune"])
def test_data_dir_that_is_a_file(tmp_path, capsys, tiny_dir, command):
    f = tmp_path / "data.tsv"
    f.write_text("sentence\tlabel\n")
    argv = (["score", "--model", tiny_dir, "--task", "sst2", "--data-dir", str(f), "--no-progress"] if command == "score"
            else _finetune(tiny_dir, f, tmp_path / "run"))
    assert main(argv) == 2
    line = _error_line(capsys)
    assert f"--data-dir {f} is a file; give the folder holding glue/ and superglue/" in line


def test_plan_out_folder_and_finetune_out_file(tmp_path, capsys, tiny_dir, data_dir):
    assert main(["plan", "--model", tiny_dir, "--strategy", "full", "--out", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert f"--out {tmp_path} is a folder; give a file name" in line and ".tmp" not in line
    assert list(tmp_path.iterdir()) == []
    f = tmp_path / "file"
    f.write_text("x")
    assert main(_finetune(tiny_dir, data_dir, f)) == 2
    assert f"--out {f} is a file; give a folder" in _error_line(capsys) and f.read_text() == "x"


def test_atomic_write_to_a_folder_names_it(tmp_path):
    from fastsel.utils.atomic import atomic_write_text

    with pytest.raises(IsADirectoryError, match="is a folder; give a file name"):
        atomic_write_text(tmp_path, "x")
    assert list(tmp_path.iterdir()) == []


# -- 3: files and signals ---------------------------------------------------------------------------------


def test_plots_are_written_atomically(tmp_path, monkeypatch):
    """A plot that fails half-way leaves the previous file as it was and no temporary file."""
    from matplotlib.figure import Figure

    from fastsel.scores.layer_scores import LayerScore, LayerScores
    from fastsel.scores.plot import plot_layer_curves, plot_layer_scores
    from fastsel.train.finetune import plot_curves
    from fastsel.train.loop import EpochRecord, TrainResult

    scores = LayerScores("fisher", "m", "sst2", "train", 4, [LayerScore(l, f"layer.{l}", float(l + 1)) for l in range(3)])
    result = TrainResult([EpochRecord(1, 0.7, 1.0, 1.0, {"accuracy": 0.5}, 0.69)], 1, {"accuracy": 0.5}, "accuracy", 10)
    writers = [lambda p: plot_layer_scores(scores, p), lambda p: plot_layer_curves(scores, p),
               lambda p: plot_curves(result, p, "t")]
    for i, write in enumerate(writers):
        path = tmp_path / f"p{i}.png"
        write(path)
        before = path.read_bytes()
        assert before[:4] == b"\x89PNG"
        real = Figure.savefig

        def broken(self, fname, **kw):
            fname.write(b"\x89PNG half an image")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(Figure, "savefig", broken)
        with pytest.raises(OSError, match="nothing was replaced"):
            write(path)
        monkeypatch.setattr(Figure, "savefig", real)
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p0.png", "p1.png", "p2.png"]
    write(tmp_path / "noext")  # as matplotlib: no suffix, PNG to NAME.png
    assert (tmp_path / "noext.png").read_bytes()[:4] == b"\x89PNG"


def _signal_while_writing(monkeypatch, signum: int, match: str) -> dict:
    """The first write into a file whose name contains ``match`` sends ``signum`` to this process, mid-write."""
    import fastsel.utils.atomic as atomic

    sent = {"n": 0}
    real = atomic._Recorder.write

    def write(self, data):
        if not sent["n"] and match in os.readlink(f"/proc/self/fd/{self._f.fileno()}"):
            sent["n"] += 1
            os.kill(os.getpid(), signum)  # the handler runs at the next bytecode: inside torch.save's writer
            for _ in range(1000):
                pass
        return real(self, data)

    monkeypatch.setattr(atomic._Recorder, "write", write)
    return sent


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_a_score_checkpoint_write(tmp_path, capsys, monkeypatch, tiny_dir, data_dir, signum, code):
    ckdir, out = tmp_path / "ck", tmp_path / "s.json"
    argv = _score(tiny_dir, data_dir, "--checkpoint", str(ckdir), "--checkpoint-every", "4", "--out", str(out),
                  "--prefetch", "0", n=16)
    sent = _signal_while_writing(monkeypatch, signum, ".rank0-of-1.pt.")
    assert main(argv) == code
    err = capsys.readouterr().err
    assert sent["n"] == 1 and "enforce fail" not in err and "Traceback" not in err, err
    assert f"the checkpoint {ckdir} is kept: rerun the same command with --resume to continue" in err, err
    assert not out.exists() and sorted(p.name for p in ckdir.iterdir()) == ["rank0-of-1.pt"]  # whole, no temporary
    state = torch.load(rank_file(ckdir, 0, 1), weights_only=False)
    assert load_checkpoint(rank_file(ckdir, 0, 1), state["settings"])["cursor"] == 1
    monkeypatch.undo()
    assert main(argv + ["--resume"]) == 0
    assert "resumes at batch 1" in capsys.readouterr().err
    assert json.loads(out.read_text())["num_examples"] == 16 and not ckdir.exists()  # finished: checkpoint removed


def test_signal_during_a_training_checkpoint_write(tmp_path, capsys, monkeypatch, tiny_dir, data_dir):
    run = tmp_path / "run"
    argv = _finetune(tiny_dir, data_dir, run, "--checkpoint-every", "1")
    sent = _signal_while_writing(monkeypatch, signal.SIGINT, ".train-state.pt.")
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert sent["n"] == 1 and "enforce fail" not in err and "Traceback" not in err, err
    assert f"the checkpoint {run / 'train-state.pt'} is kept: rerun the same command with --resume to continue" in err
    assert sorted(p.name for p in run.iterdir()) == ["train-state.pt"]
    monkeypatch.undo()
    assert main(argv + ["--resume"]) == 0
    assert "resuming training at epoch 1, batch 1" in capsys.readouterr().err
    assert (run / "results.json").is_file() and not (run / "train-state.pt").exists()


def test_interrupt_without_checkpoint_has_no_resume_hint(tmp_path, capsys, monkeypatch, tiny_dir, data_dir):
    import fastsel.cli.app as app

    def interrupted(cfg, pcfg, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "score", interrupted)
    assert main(_score(tiny_dir, data_dir)) == 130
    assert capsys.readouterr().err.strip() == "fastsel: interrupted"


def test_deferred_signals_deliver_after_the_block():
    from fastsel.utils.atomic import deferred_signals

    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
            done.append("the block ran to its end")
    assert done == ["the block ran to its end"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- 4: checkpoints of a finished run ---------------------------------------------------------------------


def test_score_checkpoints_are_removed_unless_kept(tmp_path, capsys, tiny_dir, data_dir):
    ckdir, out = tmp_path / "ck", tmp_path / "s.json"
    argv = _score(tiny_dir, data_dir, "--checkpoint", str(ckdir), "--checkpoint-every", "4", "--out", str(out))
    assert main(argv) == 0
    assert json.loads(out.read_text())["num_examples"] == 8 and not ckdir.exists()
    assert main(argv + ["--keep-checkpoints"]) == 0
    state = torch.load(rank_file(ckdir, 0, 1), weights_only=False)
    assert state["complete"] and state["examples"] == 8
    # what resuming reads, and the settings that name a mismatch: nothing else
    assert set(state) <= {"format", "settings", "fingerprint", "cursor", "examples", "consumers", "complete", "extra"}
    fisher = state["consumers"]["fisher"]  # the grouped parameters have no plain sums (every batch had groups)
    # the blocks' sums per group only; one plain sum for the parameters that are not grouped (embeddings, head)
    assert len(fisher["group_sums"]) == 4 and not set(fisher["sums"]) & set(fisher["group_sums"][0])
    capsys.readouterr()
    assert main(_score(tiny_dir, data_dir, "--keep-checkpoints")) == 2
    assert "--keep-checkpoints only applies with --checkpoint" in _error_line(capsys)


def test_train_state_is_removed_unless_kept(tmp_path, capsys, tiny_dir, data_dir):
    run = tmp_path / "run"
    assert main(_finetune(tiny_dir, data_dir, run)) == 0, capsys.readouterr().err
    names = {p.name for p in run.iterdir()}
    assert "train-state.pt" not in names and {"results.json", "trained.safetensors", "plan.json", "curve.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert main(_finetune(tiny_dir, data_dir, run, "--keep-checkpoints")) == 0
    assert (run / "train-state.pt").is_file()
    assert json.loads((run / "results.json").read_text())["job"]["keep_checkpoints"] is True
