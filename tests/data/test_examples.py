"""Tests for fastsel.data.examples: the Examples container and seeded, optionally class-balanced subsampling."""
from __future__ import annotations

from collections import Counter

import pytest

from fastsel.data.examples import Examples, subsample
from fastsel.data.readers import load_examples
from fastsel.data.specs import TASKS


# ---------------------------------------------------------------------------------------------- subsampling


def test_subsample_seeded(data_dir):
    if not (data_dir / "glue" / "SST-2").is_dir():
        pytest.skip(f"glue/SST-2 not in {data_dir}")
    full = load_examples("sst2", data_dir, "validation")
    a = load_examples("sst2", data_dir, "validation", num_examples=100, seed=3)
    b = load_examples("sst2", data_dir, "validation", num_examples=100, seed=3)
    c = load_examples("sst2", data_dir, "validation", num_examples=100, seed=4)
    assert len(a) == 100 and a.text_a == b.text_a and a.labels == b.labels
    assert a.text_a != c.text_a
    assert set(a.text_a) <= set(full.text_a) and len(set(a.text_a)) == len(a.text_a)
    big = load_examples("sst2", data_dir, "validation", num_examples=10_000)
    assert big.text_a == full.text_a


def test_balanced(data_dir):
    ex = load_examples("cola", data_dir, "validation", num_examples=101, seed=1, balanced=True)
    assert len(ex) == 101 and sorted(Counter(ex.labels).values()) == [50, 51]
    again = load_examples("cola", data_dir, "validation", num_examples=101, seed=1, balanced=True)
    assert again.text_a == ex.text_a
    # CB validation: 23 entailment, 28 contradiction, 5 neutral -> small class capped, rest redistributed
    cb = load_examples("cb", data_dir, "validation", num_examples=30, balanced=True)
    assert dict(Counter(cb.labels)) == {0: 13, 1: 12, 2: 5}
    cb_all = load_examples("cb", data_dir, "validation", num_examples=1000, balanced=True)
    assert len(cb_all) == 56
    with pytest.raises(ValueError, match="regression"):
        load_examples("stsb", data_dir, "validation", num_examples=10, balanced=True)


def test_examples_lengths_and_subset():
    ex = Examples(TASKS["rte"], "train", ["a", "b", "c"], ["x", "y", "z"], [0, 1, 1])
    assert len(ex) == 3
    sub = ex.subset([2, 0])
    assert sub.text_a == ["c", "a"] and sub.text_b == ["z", "x"] and sub.labels == [1, 0] and sub.task is ex.task
    with pytest.raises(ValueError, match="same length"):
        Examples(TASKS["rte"], "train", ["a", "b"], ["x"], [0, 1])


def test_subsample_without_files():
    labels = [0] * 20 + [1] * 5
    ex = Examples(TASKS["sst2"], "train", [f"t{i}" for i in range(25)], None, labels)
    assert subsample(ex, None, 0, False) is ex
    picked = subsample(ex, 10, 3, False)
    assert len(picked) == 10 and picked.text_a == subsample(ex, 10, 3, False).text_a
    assert picked.text_a == sorted(picked.text_a, key=lambda t: int(t[1:]))  # file order kept
    assert dict(Counter(subsample(ex, 12, 0, True).labels)) == {0: 7, 1: 5}  # the small class capped
    with pytest.raises(ValueError, match="needs num_examples"):
        subsample(ex, None, 0, True)
    with pytest.raises(ValueError, match=">= 0"):
        subsample(ex, -1, 0, False)
