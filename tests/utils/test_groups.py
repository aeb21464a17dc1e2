"""Rows of each group in a batch: slices for a batch sorted by group, indices otherwise; the sort itself."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fastsel.utils.groups import group_rows, num_rows, sort_by_group, take_rows


def test_sorted_groups_give_slices_in_group_order():
    assert group_rows(torch.tensor([0, 0, 1, 3, 3, 3]), 4) == [(0, slice(0, 2)), (1, slice(2, 3)), (3, slice(3, 6))]


def test_unsorted_groups_give_indices():
    rows = group_rows(torch.tensor([1, 0, 1, 0]), 2)
    assert [(g, r.tolist()) for g, r in rows] == [(0, [1, 3]), (1, [0, 2])]


def test_empty_batch_has_no_groups():
    assert group_rows(torch.zeros(0, dtype=torch.int64), 3) == []


@pytest.mark.parametrize("bad", [[0, 2], [-1, 0]])
def test_group_outside_the_range_is_an_error(bad):
    with pytest.raises(ValueError, match=r"every example a group in 0\.\.1"):
        group_rows(torch.tensor(bad), 2)


def test_take_rows_and_num_rows():
    t = torch.arange(10).reshape(5, 2)
    assert take_rows(t, None) is t
    view = take_rows(t, slice(1, 3))
    assert view.data_ptr() == t[1].data_ptr() and view.shape == (2, 2)  # a view, no copy
    assert_close(take_rows(t, torch.tensor([3, 0])), t[[3, 0]])
    assert num_rows(slice(2, 5)) == 3 and num_rows(torch.tensor([4, 1])) == 2


def test_sort_by_group_is_stable_and_moves_every_entry():
    batch = {"index": torch.tensor([5, 2, 8, 3, 4]), "input_ids": torch.arange(10).reshape(5, 2),
             "labels": torch.tensor([0, 1, 0, 1, 1])}
    out = sort_by_group(batch, 3)  # groups 2, 2, 2, 0, 1 -> rows 3, 4, 0, 1, 2
    assert out["index"].tolist() == [3, 4, 5, 2, 8]
    assert_close(out["input_ids"], batch["input_ids"][[3, 4, 0, 1, 2]])
    assert out["labels"].tolist() == [1, 1, 0, 1, 0]
    rows = group_rows(out["index"] % 3, 3)
    assert all(isinstance(r, slice) for _, r in rows)


def test_sort_by_group_leaves_a_sorted_batch_as_it_is():
    batch = {"index": torch.tensor([4, 8, 3]), "input_ids": torch.ones(3, 2)}
    out = sort_by_group(batch, 4)  # groups 0, 0, 3
    assert all(out[k] is batch[k] for k in batch)


def test_with_groups_whole_batch_or_index_mod_k_sorted():
    from fastsel.utils.groups import with_groups

    batch = {"index": torch.tensor([5, 2, 8, 3]), "input_ids": torch.arange(8).view(4, 2)}
    whole = with_groups(batch, 4, 3)
    assert whole["group"].tolist() == [3, 3, 3, 3] and whole["index"] is batch["index"]
    per = with_groups(batch, 4, None)
    assert per["group"].tolist() == [0, 1, 2, 3] and per["index"].tolist() == [8, 5, 2, 3]
    assert per["input_ids"].tolist() == [[4, 5], [0, 1], [2, 3], [6, 7]] and per["group"].device.type == "cpu"
    with pytest.raises(ValueError, match="batch group 4 outside 0..3"):
        with_groups(batch, 4, 4)
