"""Checkpoints and --resume: a real `python -m fastsel score --metric fisher,variability` killed with SIGKILL and restarted gives the
scores of an uninterrupted run, bit for bit; mismatched settings are refused; files are never torn."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsel.pipeline.checkpoint import CheckpointMismatch, load_checkpoint, rank_file, save_checkpoint
from fastsel.pipeline.outputs import output_path
from tests.cli_helpers import kill_when

N = 600


def _cmd(tiny_dir, data_dir, out, *extra):
    return [sys.executable, "-m", "fastsel", "score", "--metric", "fisher,variability", "--model", tiny_dir, "--task", "sst2",
            "--data-dir", str(data_dir),
            "--num-examples", str(N), "--batch-size", "4", "--max-length", "40", "--fisher", "sampled", "--no-progress",
            "--out", str(out), *extra]


def _core(path: Path) -> dict:
    """The scores of both metrics of one pass (written as path.fisher.json and path.variability.json)."""
    out = {}
    for metric in ("fisher", "variability"):
        d = json.loads(output_path(path, metric, 2).read_text())
        out[metric] = {k: d[k] for k in ("layers", "ranking", "extra", "num_examples", "mode", "ranking_confidence")}
    return out


def _written(path: Path) -> bool:
    return any(output_path(path, m, 2).exists() for m in ("fisher", "variability"))


def _cursor(ckpt: Path) -> tuple[int, bool]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return state["cursor"], state["complete"]


def _run_until_checkpoint(cmd, env, ckpt: Path, min_cursor: int, timeout: float = 300) -> int:
    """Start ``cmd``, SIGKILL it once ``ckpt`` holds a cursor >= min_cursor; return the cursor it had."""
    before = _cursor(ckpt)[0] if ckpt.exists() else -1
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    def ready() -> bool:
        if not ckpt.exists():
            return False
        cursor, complete = _cursor(ckpt)
        return cursor >= min_cursor and cursor != before and not complete

    rc = kill_when(proc, ready, timeout=timeout, poll=0.02)
    assert rc == -signal.SIGKILL, f"run was not killed mid-way (rc {rc}): {proc.stderr.read().decode()[-2000:]}"
    cursor, complete = _cursor(ckpt)  # it may have saved once more before the signal landed
    assert cursor >= min_cursor and not complete
    return cursor


def test_sigkill_and_resume_give_the_uninterrupted_scores(tmp_path, tiny_dir, data_dir, env):
    ref = tmp_path / "ref.json"
    subprocess.run(_cmd(tiny_dir, data_dir, ref), env=env, check=True, capture_output=True)

    out, ckdir = tmp_path / "resumed.json", tmp_path / "ckpt"
    ckpt = rank_file(ckdir, 0, 1)
    args = _cmd(tiny_dir, data_dir, out, "--checkpoint", str(ckdir), "--checkpoint-every", "20")
    first = _run_until_checkpoint(args, env, ckpt, min_cursor=1)
    assert not _written(out)  # no output, and certainly no half-written one
    assert first < N // 4
    # resume, and kill again later: resuming a resumed run works too
    second = _run_until_checkpoint(args + ["--resume"], env, ckpt, min_cursor=first + 10)
    assert second > first and not _written(out)
    assert not [p for p in ckdir.iterdir() if p.name != ckpt.name and not p.name.endswith(".tmp")]
    done = subprocess.run(args + ["--resume", "--keep-checkpoints"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resumes at batch {second}/" in done.stderr
    assert _core(out) == _core(ref)  # same batches in the same order: bit-identical sums
    assert _cursor(ckpt) == (N // 4, True)  # kept (--keep-checkpoints; a finished run's are removed without it)

    # a finished checkpoint resumes to the same result without recomputing
    again = tmp_path / "again.json"
    rerun = subprocess.run(_cmd(tiny_dir, data_dir, again, "--checkpoint", str(ckdir), "--checkpoint-every", "20", "--resume",
                                "--keep-checkpoints"), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0 and _core(again) == _core(ref)

    # other settings: refused with a clear message
    bad = subprocess.run(_cmd(tiny_dir, data_dir, again, "--checkpoint", str(ckdir), "--resume", "--seed", "3"),
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "other settings" in bad.stderr and "seed" in bad.stderr and "Traceback" not in bad.stderr


def test_checkpoint_atomic_write_and_mismatch(tmp_path):
    path = rank_file(tmp_path, 0, 2)
    settings = {"a": 1, "b": [1, 2]}
    state = {"fisher": {"sums": {"w": torch.arange(4.0)}, "num_examples": 3}}
    save_checkpoint(path, settings=settings, cursor=5, examples=17, consumers=state)
    (tmp_path / f".{path.name}.abc.tmp").write_bytes(b"torn")  # a write that was killed mid-way
    got = load_checkpoint(path, settings)
    assert got["cursor"] == 5 and got["examples"] == 17 and torch.equal(got["consumers"]["fisher"]["sums"]["w"], torch.arange(4.0))
    assert load_checkpoint(tmp_path / "none.pt", settings) is None
    with pytest.raises(CheckpointMismatch, match="a: 1 -> 2"):
        load_checkpoint(path, {"a": 2, "b": [1, 2]})
    torch.save({"x": 1}, tmp_path / "junk.pt")
    with pytest.raises(CheckpointMismatch, match="not a fastsel checkpoint"):
        load_checkpoint(tmp_path / "junk.pt", settings)
