"""The accumulator on its own: where a batch's squares go (plain sums or per-group sums of the grouped
parameters), and what is read off them (totals, mean, the checkpoint state)."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fastsel.capture.accumulator import SquaredGradSums


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
    assert set(acc.sums) == {"a.weight", "a.bias"}  # allocated again for the grouped parameters


def test_grouped_parameters_have_no_plain_sums_until_used():
    acc = make()
    acc.enable_groups(2, ["a.bias"])
    assert set(acc.sums) == {"a.weight"} and acc.group_names == {"a.bias"}
    assert [set(g) for g in acc.group_sums] == [{"a.bias"}, {"a.bias"}]
    with pytest.raises(ValueError, match="not accumulated"):
        make().enable_groups(2, ["nope"])


def test_group_members_unsorted_batch_gives_indices():
    acc = make()
    acc.enable_groups(3)
    members = acc.group_members(5, torch.tensor([2, 0, 2, 2, 0]))
    assert [(k, idx.tolist()) for k, idx in members] == [(0, [1, 4]), (2, [0, 2, 3])]  # group 1 is absent
    assert acc.group_counts == [2, 0, 3] and not acc.sums_used
    dests = acc.destinations(members)
    assert [(e.tolist(), d == acc.group_sums[k]) for (e, d), k in zip(dests, (0, 2))] == [([1, 4], True), ([0, 2, 3], True)]
    # a slice of the batch: indices relative to its start, groups without an example there left out
    sliced = acc.destinations(members, {"bias": "a.bias"}, 2, 4)
    assert [(e.tolist(), d["bias"] is acc.group_sums[2]["a.bias"]) for e, d in sliced] == [([0, 1], True)]


def test_group_members_sorted_batch_gives_slices():
    acc = make()
    acc.enable_groups(3)
    members = acc.group_members(5, torch.tensor([0, 0, 2, 2, 2]))
    assert members == [(0, slice(0, 2)), (2, slice(2, 5))]
    assert acc.group_counts == [2, 0, 3]
    sliced = acc.destinations(members, {"bias": "a.bias"}, 1, 3)  # examples 1 (group 0) and 2 (group 2)
    assert [(e, d["bias"] is acc.group_sums[k]["a.bias"]) for (e, d), k in zip(sliced, (0, 2))] == [
        (slice(0, 1), True), (slice(1, 2), True)]
    assert acc.destinations(members, None, 3, 5)[0][0] == slice(0, 2)  # group 0 has no example there


def test_grouped_batch_sends_ungrouped_parameters_to_the_plain_sums():
    acc = make()
    acc.enable_groups(2, ["a.bias"])
    members = acc.group_members(3, torch.tensor([0, 1, 1]))
    plain, *grouped = acc.destinations(members, {"weight": "a.weight", "bias": "a.bias"})
    assert plain[0] is None and set(plain[1]) == {"weight"} and plain[1]["weight"] is acc.sums["a.weight"]
    assert [(e, set(d)) for e, d in grouped] == [(slice(0, 1), {"bias"}), (slice(1, 3), {"bias"})]
    assert acc.destinations(members, {"bias": "a.bias"}, 0, 1) == [(slice(0, 1), {"bias": acc.group_sums[0]["a.bias"]})]


@pytest.mark.parametrize("groups, match", [(torch.tensor([0, 1]), "shape"), (torch.tensor([0, 1, 3]), "every example"),
                                           (torch.tensor([0, -1, 1]), "every example")])
def test_bad_groups(groups, match):
    acc = make()
    acc.enable_groups(2)
    with pytest.raises(ValueError, match=match):
        acc.group_members(3, groups)
    assert acc.group_counts == [0, 0]


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


def test_totals_with_some_parameters_grouped():
    acc = make()
    acc.enable_groups(2, ["a.bias"])
    fill(acc, acc.group_members(3, torch.tensor([1, 0, 1])), 2.0)
    totals = acc.totals()
    assert list(totals) == ["a.weight", "a.bias"]  # the parameters' order
    assert_close(totals["a.weight"], torch.full((3,), 2.0))  # one destination for the whole batch
    assert_close(totals["a.bias"], torch.full((2, 2), 4.0))  # one per group present
    assert [n for n, _ in acc.accumulators()] == ["a.weight", "a.bias", "a.bias"]


def test_mean_without_release_leaves_the_sums():
    acc = make()
    acc.enable_groups(2, ["a.bias"])
    fill(acc, acc.group_members(2, torch.tensor([0, 1])), 2.0)
    acc.num_examples = 2
    mean = acc.mean()
    assert_close(mean["a.weight"], torch.full((3,), 1.0))
    assert_close(mean["a.bias"], torch.full((2, 2), 2.0))
    assert_close(acc.sums["a.weight"], torch.full((3,), 2.0))  # still the sums
    assert_close(acc.mean()["a.weight"], torch.full((3,), 1.0))  # readable again
    assert not acc.released


def test_mean_release_divides_the_sums_in_place_and_spends_them():
    acc = make()
    acc.enable_groups(2, ["a.bias"])
    fill(acc, acc.group_members(2, torch.tensor([0, 1])), 2.0)
    acc.num_examples = 2
    expected = acc.mean()
    plain = acc.sums["a.weight"]
    mean = acc.mean(release=True)
    for n, m in expected.items():
        assert_close(mean[n], m)
    assert mean["a.weight"] is plain  # the plain sums themselves: no copy
    assert [g["a.bias"].tolist() for g in acc.group_sums] == [[[2.0, 2.0]] * 2] * 2  # group sums kept
    assert acc.released
    for read in (acc.totals, acc.mean, acc.state_dict, acc.accumulators, lambda: acc.group_members(2)):
        with pytest.raises(RuntimeError, match="turned into means"):
            read()


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
    assert not other.sums_used and other.sums == {}
    for mine, theirs in zip(other.group_sums, acc.group_sums):
        for n in theirs:
            assert_close(mine[n], theirs[n])
    plain = make()
    plain.enable_groups(3)
    with pytest.raises(ValueError, match="per-group"):
        plain.load_state_dict(state)
    other_names = make()
    other_names.enable_groups(2, ["a.bias"])
    with pytest.raises(ValueError, match="per-group"):
        other_names.load_state_dict(state)


def test_state_dict_with_plain_sums_of_grouped_parameters():
    acc = make()
    acc.enable_groups(2, ["a.bias"])
    fill(acc, acc.group_members(2, torch.tensor([0, 1])), 1.0)
    fill(acc, acc.group_members(1), 0.5)  # a batch without groups: plain sums for a.bias too
    other = make()
    other.enable_groups(2, ["a.bias"])
    other.load_state_dict(acc.state_dict())
    assert other.sums_used and set(other.sums) == {"a.weight", "a.bias"}
    for n, t in acc.totals().items():
        assert_close(other.totals()[n], t)


def test_state_dict_with_plain_sums():
    acc = make()
    fill(acc, acc.group_members(2), 1.5)
    acc.num_examples = 2
    other = make()
    other.load_state_dict(acc.state_dict())
    assert other.sums_used and other.num_examples == 2
    assert_close(other.sums["a.bias"], torch.full((2, 2), 1.5))
