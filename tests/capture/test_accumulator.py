"""The accumulator on its own: where a batch's squares go (plain sums or per-group sums), and what is read off
them (totals, mean, the checkpoint state)."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fastsel.capture.accumulator import SquaredGradSums, take


def make() -> SquaredGradSums:
    return SquaredGradSums({"a.weight": torch.ones(3, dtype=torch.float64), "a.bias": torch.ones(2, 2)})


def test_sums_are_fp32_zeros_shaped_like_the_parameters():
    acc = make()
    assert {n: (s.shape, s.dtype) for n, s in acc.sums.items()} == {
        "a.weight": ((3,), torch.float32), "a.bias": ((2, 2), torch.float32)}
    assert not any(s.any() for s in acc.sums.values())
    assert acc.num_examples == 0 and not acc.fallback_params and not acc.sums_used


def test_a_batch_without_groups_goes_to_the_plain_sums():
    acc = make()
    assert acc.group_members(4) is None and acc.sums_used
    ((examples, dst),) = acc.destinations(None, {"weight": "a.weight"})
    assert examples is None and dst["weight"] is acc.sums["a.weight"] and set(dst) == {"weight"}
    acc.enable_groups(2)
    assert acc.group_members(4, None) is None  # groups enabled but not given: the plain sums


def test_group_members_and_destinations():
    acc = make()
    acc.enable_groups(3)
    members = acc.group_members(5, torch.tensor([2, 0, 2, 2, 0]))
    assert [(k, idx.tolist()) for k, idx in members] == [(0, [1, 4]), (2, [0, 2, 3])]  # group 1 is absent
    assert acc.group_counts == [2, 0, 3] and not acc.sums_used
    dests = acc.destinations(members)
    assert [(e.tolist(), d is acc.group_sums[k]) for (e, d), k in zip(dests, (0, 2))] == [([1, 4], True), ([0, 2, 3], True)]
    # a slice of the batch: indices relative to its start, groups without an example there left out
    sliced = acc.destinations(members, {"bias": "a.bias"}, 2, 4)
    assert [(e.tolist(), d["bias"] is acc.group_sums[2]["a.bias"]) for e, d in sliced] == [([0, 1], True)]


@pytest.mark.parametrize("groups, match", [(torch.tensor([0, 1]), "shape"), (torch.tensor([0, 1, 3]), "every example")])
def test_bad_groups(groups, match):
    acc = make()
    acc.enable_groups(2)
    with pytest.raises(ValueError, match=match):
        acc.group_members(3, groups)
    assert acc.group_counts == [0, 0]


def test_take():
    t = torch.arange(10).reshape(5, 2)
    assert take(t, None) is t
    assert_close(take(t, torch.tensor([3, 0])), t[[3, 0]])


def fill(acc: SquaredGradSums, members, value: float) -> None:
    for _, dst in acc.destinations(members):
        for s in dst.values():
            s.add_(value)


def test_totals_and_mean():
    acc = make()
    fill(acc, acc.group_members(2), 1.0)
    acc.num_examples = 2
    assert acc.totals() is acc.sums
    assert_close(acc.mean()["a.weight"], torch.full((3,), 0.5))
    acc = make()
    with pytest.raises(ValueError, match="no examples"):
        acc.mean()
    acc.enable_groups(2)
    fill(acc, acc.group_members(3, torch.tensor([0, 1, 1])), 2.0)  # group-only batch: sums unused
    assert_close(acc.totals()["a.bias"], torch.full((2, 2), 4.0))
    fill(acc, acc.group_members(1), 1.0)  # and a batch without groups
    assert_close(acc.totals()["a.bias"], torch.full((2, 2), 5.0))
    assert acc.totals()["a.bias"] is not acc.group_sums[0]["a.bias"]  # a new tensor, not a group's sums


def test_state_dict_round_trip():
    acc = make()
    acc.enable_groups(2)
    fill(acc, acc.group_members(3, torch.tensor([0, 1, 1])), 2.0)
    acc.num_examples, acc.fallback_params = 3, {"a.bias"}
    state = acc.state_dict()
    assert state["sums"] == {}  # only group sums were written
    other = make()
    other.enable_groups(2)
    other.load_state_dict(state)
    assert other.num_examples == 3 and other.fallback_params == {"a.bias"} and other.group_counts == [1, 2]
    assert not other.sums_used
    for mine, theirs in zip(other.group_sums, acc.group_sums):
        for n in theirs:
            assert_close(mine[n], theirs[n])
    plain = make()
    plain.enable_groups(3)
    with pytest.raises(ValueError, match="per-group"):
        plain.load_state_dict(state)


def test_state_dict_with_plain_sums():
    acc = make()
    fill(acc, acc.group_members(2), 1.5)
    acc.num_examples = 2
    other = make()
    other.load_state_dict(acc.state_dict())
    assert other.sums_used and other.num_examples == 2
    assert_close(other.sums["a.bias"], torch.full((2, 2), 1.5))
