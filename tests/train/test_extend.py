"""fastsel finetune --resume with another --epochs: a run goes on where it stopped (issue 24)."""
from __future__ import annotations

import json

import pytest
import torch

from fastsel.cli.app import main


def _finetune(model, data_dir, out, *extra):
    return ["finetune", "--model", str(model), "--task", "rte", "--data-dir", str(data_dir), "--strategy", "position-top-1",
            "--train-examples", "8", "--eval-examples", "8",
            "--batch-size", "4", "--max-length", "16", "--lr", "1e-3", "--no-progress", "--out", str(out), *extra]


def _history(run):
    out = json.loads((run / "results.json").read_text())
    for h in out["history"]:
        h.pop("train_seconds"), h.pop("eval_seconds")
    return out


@pytest.fixture
def two_epochs(tmp_path, tiny_dir, data_dir):
    run = tmp_path / "run"
    assert main(_finetune(tiny_dir, data_dir, run, "--epochs", "2", "--keep-checkpoints")) == 0
    return run


def test_resume_with_more_epochs_extends_the_run(two_epochs, tiny_dir, data_dir, capsys):
    before = _history(two_epochs)
    capsys.readouterr()
    assert main(_finetune(tiny_dir, data_dir, two_epochs, "--epochs", "3", "--resume", "--keep-checkpoints")) == 0
    err = capsys.readouterr().err
    assert "training goes on to 3 epochs instead of 2 (from step 4)" in err
    after = _history(two_epochs)
    assert [h["epoch"] for h in after["history"]] == [1, 2, 3]
    assert after["history"][:2] == before["history"]  # the first two epochs are the finished run's
    ext = after["extensions"]
    assert len(ext) == 1 and ext[0]["from_epochs"] == 2 and ext[0]["to_epochs"] == 3 and ext[0]["at_step"] == 4
    # the learning rate followed the 3-epoch schedule: 6 steps (8 examples, batches of 4), decayed to 0 at the last
    state = torch.load(two_epochs / "train-state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 6 and state["scheduler"]["last_epoch"] == 6 and state["epochs"] == 3
    assert all(g["lr"] == 0.0 for g in state["optimizer"]["param_groups"])
    # the same epochs again: nothing left to train, the results stand (no second extension record)
    assert main(_finetune(tiny_dir, data_dir, two_epochs, "--epochs", "3", "--resume", "--keep-checkpoints")) == 0
    again = _history(two_epochs)
    assert again["history"] == after["history"] and len(again["extensions"]) == 1


def test_resume_learning_rate_follows_the_new_schedule(two_epochs, tiny_dir, data_dir, monkeypatch):
    """The first step after the extension uses the 4-epoch schedule's rate at step 4, not the finished run's 0."""
    from transformers import get_linear_schedule_with_warmup

    seen: list[float] = []
    step = torch.optim.AdamW.step

    def record(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    assert main(_finetune(tiny_dir, data_dir, two_epochs, "--epochs", "4", "--resume")) == 0
    got = list(seen)  # the reference below steps an AdamW too
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = get_linear_schedule_with_warmup(opt, 1, 8)  # ceil(0.06 * 8) warmup steps, 4 epochs of 2 steps
    want = []
    for _ in range(8):
        want.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradient: nothing moves; the schedule's step follows an optimizer step, as in training
        sched.step()
    assert got == pytest.approx(want[4:], rel=1e-12)


def test_resume_with_fewer_epochs_than_trained_is_refused(two_epochs, tiny_dir, data_dir, capsys):
    capsys.readouterr()
    assert main(_finetune(tiny_dir, data_dir, two_epochs, "--epochs", "1", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") or "fastsel:" in err[-1]
    assert "has trained 2 epoch(s) already; give --epochs 2 or more" in err[-1]


def test_resume_of_a_finished_run_without_its_state_is_refused(tmp_path, tiny_dir, data_dir, capsys):
    run = tmp_path / "done"
    assert main(_finetune(tiny_dir, data_dir, run, "--epochs", "1")) == 0
    assert not (run / "train-state.pt").exists()
    capsys.readouterr()
    assert main(_finetune(tiny_dir, data_dir, run, "--epochs", "2", "--resume")) == 2
    err = capsys.readouterr().err
    assert "has finished and its training state was removed" in err and "--keep-checkpoints" in err
    assert "Traceback" not in err
