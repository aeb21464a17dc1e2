"""pipeline.checkpoint.read_torch_file: a damaged checkpoint is one CheckpointMismatch line, never the reader's own
error; deterministic versions of the e2e test's random bytes."""
from __future__ import annotations

import pytest
import torch

from fastsel.pipeline import checkpoint
from fastsel.pipeline.checkpoint import CheckpointMismatch, read_torch_file


def _refuse_load(*args, **kwargs):
    raise MemoryError  # what torch's legacy unpickler can raise on random bytes that ask for a huge allocation


@pytest.mark.parametrize("content", [b"\x80\x02}q\x00" + bytes(range(256)) * 8, b"not a checkpoint at all"])
def test_a_file_that_is_not_a_zip_is_refused_without_unpickling(tmp_path, monkeypatch, content):
    path = tmp_path / "rank0.pt"
    path.write_bytes(content)
    monkeypatch.setattr(checkpoint.torch, "load", _refuse_load)  # reaching torch.load would raise MemoryError
    with pytest.raises(CheckpointMismatch, match=r"not a torch checkpoint, \d+ bytes\); delete it"):
        read_torch_file(path, "checkpoint", "delete it and rerun")


def test_an_empty_file_is_named_empty(tmp_path):
    path = tmp_path / "rank0.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointMismatch, match=r"\(empty, 0 bytes\)"):
        read_torch_file(path, "checkpoint", "delete it and rerun")


def test_a_truncated_zip_is_named_truncated(tmp_path):
    path = tmp_path / "rank0.pt"
    torch.save({"cursor": 3, "sums": torch.ones(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatch, match=r"truncated or damaged, \d+ bytes: \w+\); delete it"):
        read_torch_file(path, "checkpoint", "delete it and rerun")


def test_a_whole_checkpoint_reads_back(tmp_path):
    path = tmp_path / "rank0.pt"
    torch.save({"cursor": 3, "sums": torch.arange(5.0)}, path)
    state = read_torch_file(path, "checkpoint", "delete it and rerun")
    assert state["cursor"] == 3
    torch.testing.assert_close(state["sums"], torch.arange(5.0))
