"""The streaming class-statistics op: kernel vs reference vs a plain numpy oracle, edge cases, invariance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastsel import ops
from fastsel.ops.backend import EXTENSION

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and EXTENSION.cuda else [])
HAS_KERNEL = EXTENSION.loaded
IMPLS = {"ref": ops.class_stats_update_ref}
if HAS_KERNEL:
    IMPLS["kernel"] = lambda *a: torch.ops.fastsel.class_stats_update(*a)


def zeros(C: int, D: int, acc=torch.float64, device="cpu"):
    return (torch.zeros(C, dtype=torch.float64, device=device), torch.zeros(C, D, dtype=acc, device=device),
            torch.zeros(C, D, D, dtype=acc, device=device))


def numpy_stats(hidden: np.ndarray, mask: np.ndarray, labels: np.ndarray, C: int):
    """Independent oracle: pooled states by a loop, then per-class count, mean and scatter by numpy."""
    pooled, labs = [], []
    for b in range(hidden.shape[0]):
        sel = mask[b] != 0
        if sel.any():
            pooled.append(hidden[b][sel].astype(np.float64).mean(0))
            labs.append(labels[b])
    D = hidden.shape[2]
    pooled = np.array(pooled).reshape(-1, D)
    labs = np.array(labs, dtype=np.int64)
    count = np.zeros(C)
    mean = np.zeros((C, D))
    m2 = np.zeros((C, D, D))
    for c in range(C):
        x = pooled[labs == c]
        count[c] = len(x)
        if len(x):
            mean[c] = x.mean(0)
            xc = x - mean[c]
            m2[c] = xc.T @ xc
    return count, mean, m2


def data(B=12, T=6, D=5, C=3, seed=0, dtype=torch.float32, p_keep=0.7):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, D, generator=g) * 3 + 1).to(dtype)
    mask = (torch.rand(B, T, generator=g) < p_keep).long()
    labels = torch.randint(0, C, (B,), generator=g)
    return hidden, mask, labels


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(12, 6, 5, 3), (1, 1, 1, 1), (33, 17, 40, 4), (8, 3, 24, 2)])
def test_matches_numpy(impl, device, dtype, shape):
    B, T, D, C = shape
    hidden, mask, labels = data(B, T, D, C, seed=sum(shape), dtype=dtype)
    acc = zeros(C, D, device=device)
    IMPLS[impl](*acc, hidden.to(device), mask.to(device), labels.to(device))
    count, mean, m2 = numpy_stats(hidden.double().numpy(), mask.numpy(), labels.numpy(), C)
    torch.testing.assert_close(acc[0].cpu(), torch.from_numpy(count))
    torch.testing.assert_close(acc[1].cpu(), torch.from_numpy(mean), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(acc[2].cpu(), torch.from_numpy(m2), rtol=1e-9, atol=1e-8)


@pytest.mark.skipif(not HAS_KERNEL, reason="compiled extension not loaded")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
def test_kernel_matches_reference_accumulating(device, acc_dtype):
    """Several updates into the same accumulators, float32 and float64 accumulators."""
    C, D = 3, 16
    a, b = zeros(C, D, acc_dtype, device), zeros(C, D, acc_dtype, device)
    for seed in range(4):
        hidden, mask, labels = data(10, 7, D, C, seed=seed)
        args = (hidden.to(device), mask.to(device), labels.to(device))
        torch.ops.fastsel.class_stats_update(*a, *args)
        ops.class_stats_update_ref(*b, *args)
    tol = dict(rtol=1e-4, atol=1e-3) if acc_dtype == torch.float32 else dict(rtol=1e-10, atol=1e-9)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_batch_size_and_order_invariance(impl):
    """Same data fed whole, in batches of 1, 5 and 7, and permuted: the same statistics (fp64)."""
    C, D = 3, 8
    hidden, mask, labels = data(40, 9, D, C, seed=3)
    whole = zeros(C, D)
    IMPLS[impl](*whole, hidden, mask, labels)
    for bs in (1, 5, 7):
        for perm in (torch.arange(40), torch.randperm(40, generator=torch.Generator().manual_seed(bs))):
            acc = zeros(C, D)
            for s in range(0, 40, bs):
                idx = perm[s : s + bs]
                IMPLS[impl](*acc, hidden[idx], mask[idx], labels[idx])
            for x, y in zip(acc, whole):
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_no_drift_with_large_offset(impl):
    """States with a large common offset (1e4) and small spread: Chan merging keeps the scatter exact."""
    C, D = 2, 4
    g = torch.Generator().manual_seed(0)
    hidden = (1e4 + torch.randn(64, 3, D, generator=g, dtype=torch.float64))
    mask = torch.ones(64, 3)
    labels = torch.arange(64) % 2
    acc = zeros(C, D)
    for s in range(0, 64, 3):
        IMPLS[impl](*acc, hidden[s : s + 3], mask[s : s + 3], labels[s : s + 3])
    count, mean, m2 = numpy_stats(hidden.numpy(), mask.numpy(), labels.numpy(), C)
    torch.testing.assert_close(acc[2], torch.from_numpy(m2), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_empty_batch_one_class_batch_and_unpooled_examples(impl):
    C, D = 3, 4
    acc = zeros(C, D)
    IMPLS[impl](*acc, torch.randn(0, 5, D), torch.ones(0, 5), torch.zeros(0, dtype=torch.long))
    assert acc[0].sum() == 0 and acc[2].abs().sum() == 0
    hidden, mask, _ = data(6, 5, D, C, seed=1, p_keep=1.0)
    labels = torch.full((6,), 2)
    mask[0] = 0  # no pooled token: skipped
    IMPLS[impl](*acc, hidden, mask, labels)
    assert acc[0].tolist() == [0.0, 0.0, 5.0]
    count, mean, m2 = numpy_stats(hidden.double().numpy(), mask.numpy(), labels.numpy(), C)
    torch.testing.assert_close(acc[1], torch.from_numpy(mean), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(acc[2], torch.from_numpy(m2), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_non_contiguous_inputs_and_bool_mask(impl):
    C, D = 2, 6
    hidden, mask, labels = data(8, 5, D, C, seed=4)
    hid_nc = hidden.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    assert not hid_nc.is_contiguous()
    a, b = zeros(C, D), zeros(C, D)
    IMPLS[impl](*a, hid_nc, mask.bool().t().contiguous().t(), labels)
    ops.class_stats_update_ref(*b, hidden, mask.float(), labels)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bad_input(impl):
    C, D = 2, 4
    hidden, mask, labels = data(4, 3, D, C)
    err = (ValueError, RuntimeError)
    with pytest.raises(err, match="out of range"):
        IMPLS[impl](*zeros(C, D), hidden, mask, labels + 5)
    with pytest.raises(err, match="int64"):
        IMPLS[impl](*zeros(C, D), hidden, mask, labels.int())
    with pytest.raises(err, match="pool_mask"):
        IMPLS[impl](*zeros(C, D), hidden, mask[:, :2], labels)
    with pytest.raises(err, match="m2"):
        count, mean, _ = zeros(C, D)
        IMPLS[impl](count, mean, torch.zeros(C, D, D + 1, dtype=torch.float64), hidden, mask, labels)
    with pytest.raises(err, match="count"):
        IMPLS[impl](torch.zeros(C), *zeros(C, D)[1:], hidden, mask, labels)


def test_wrapper_dispatches_to_a_backend():
    """The wrapper runs the backend that fastsel.ops.backend names (the kernel when the extension is loaded, else
    the reference twin), and its result is the numpy oracle's (not merely the reference's, which may be itself)."""
    from fastsel.ops.backend import op_backend

    C, D = 2, 3
    hidden, mask, labels = data(5, 4, D, C)
    chosen = op_backend("class_stats_update", hidden.device)[0]
    assert chosen == ("cpu" if HAS_KERNEL else "reference")
    a = zeros(C, D)
    ops.class_stats_update(*a, hidden, mask, labels)
    want = numpy_stats(hidden.double().numpy(), mask.numpy(), labels.numpy(), C)
    for x, y in zip(a, want):
        torch.testing.assert_close(x, torch.from_numpy(y), rtol=1e-9, atol=1e-9)
    if HAS_KERNEL:  # and bit for bit what the kernel computes when called directly
        k = zeros(C, D)
        torch.ops.fastsel.class_stats_update(*k, hidden, mask, labels)
        for x, y in zip(a, k):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_KERNEL, reason="compiled extension not loaded")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    C, D = 3, 5
    hidden, mask, labels = data(6, 4, D, C)
    for args in [(*zeros(C, D, device=device), hidden.to(device), mask.to(device), labels.to(device)),
                 (*zeros(C, D, torch.float32, device=device), hidden.to(device), mask.bool().to(device), labels.to(device))]:
        torch.library.opcheck(torch.ops.fastsel.class_stats_update.default, args)


def with_grouping(impl: str, args: tuple, grouping):
    """Call implementation ``impl`` with a class grouping: the op takes order and offsets, the twin the pair."""
    if impl == "kernel":
        return IMPLS[impl](*args, *grouping)
    return IMPLS[impl](*args, grouping)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("labels, C", [([2, 0, 1, 0, 2, 2], 3), ([1, 1, 1], 4), ([0], 2), ([], 3), ([3, 0, 3, 0], 5)])
def test_class_grouping_matches_numpy(device, labels, C):
    """order is the stable argsort of the labels; offsets[c] the number of examples of classes below c (numpy's
    cumulative bincount), absent classes included."""
    lab = torch.tensor(labels, dtype=torch.int64, device=device)
    order, offsets = ops.class_grouping(lab, C)
    assert order.dtype == offsets.dtype == torch.int64 and order.device == offsets.device == lab.device
    want_order = np.argsort(np.array(labels, dtype=np.int64), kind="stable")
    want_offsets = np.concatenate([[0], np.cumsum(np.bincount(np.array(labels, dtype=np.int64), minlength=C))])
    np.testing.assert_array_equal(order.cpu().numpy(), want_order)
    np.testing.assert_array_equal(offsets.cpu().numpy(), want_offsets)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(12, 6, 5, 3), (1, 2, 3, 2), (33, 17, 40, 4), (0, 3, 4, 2)])
def test_given_grouping_gives_the_same_statistics(impl, device, shape):
    """A class grouping made once per batch (class_grouping) changes nothing: bit for bit the statistics without it,
    and the numpy oracle's, accumulated over two batches."""
    B, T, D, C = shape
    given, own = zeros(C, D, device=device), zeros(C, D, device=device)
    batches = [data(B, T, D, C, seed=s) for s in (1, 2)]
    for hidden, mask, labels in batches:
        hidden, mask, labels = hidden.to(device), mask.to(device), labels.to(device)
        with_grouping(impl, (*given, hidden, mask, labels), ops.class_grouping(labels, C))
        IMPLS[impl](*own, hidden, mask, labels)
    for x, y in zip(given, own):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    want = numpy_stats(np.concatenate([b[0].double().numpy() for b in batches]),
                       np.concatenate([b[1].numpy() for b in batches]), np.concatenate([b[2].numpy() for b in batches]), C)
    for x, y in zip(given, want):
        torch.testing.assert_close(x.cpu(), torch.from_numpy(y), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bad_grouping(impl):
    C, D = 3, 4
    hidden, mask, labels = data(5, 3, D, C)
    order, offsets = ops.class_grouping(labels, C)
    err = (ValueError, RuntimeError)
    with pytest.raises(err, match="order must be int64"):
        with_grouping(impl, (*zeros(C, D), hidden, mask, labels), (order.int(), offsets))
    with pytest.raises(err, match="order must be int64"):
        with_grouping(impl, (*zeros(C, D), hidden, mask, labels), (order[:4], offsets))
    with pytest.raises(err, match="offsets must be int64"):
        with_grouping(impl, (*zeros(C, D), hidden, mask, labels), (order, offsets[:C]))
    with pytest.raises(err, match="offsets must be int64"):
        with_grouping(impl, (*zeros(C, D), hidden, mask, labels), (order, offsets.double()))


@pytest.mark.skipif(not HAS_KERNEL, reason="compiled extension not loaded")
def test_kernel_refuses_half_a_grouping():
    C, D = 3, 4
    hidden, mask, labels = data(5, 3, D, C)
    order, offsets = ops.class_grouping(labels, C)
    with pytest.raises(RuntimeError, match="go together"):
        torch.ops.fastsel.class_stats_update(*zeros(C, D), hidden, mask, labels, order, None)
    with pytest.raises(RuntimeError, match="go together"):
        torch.ops.fastsel.class_stats_update(*zeros(C, D), hidden, mask, labels, None, offsets)


@pytest.mark.skipif(not HAS_KERNEL, reason="compiled extension not loaded")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_grouping(device):
    C, D = 3, 5
    hidden, mask, labels = data(6, 4, D, C)
    labels = labels.to(device)
    args = (*zeros(C, D, device=device), hidden.to(device), mask.to(device), labels, *ops.class_grouping(labels, C))
    torch.library.opcheck(torch.ops.fastsel.class_stats_update.default, args)


# -- L layers of one batch in one call --------------------------------------------------------------


def layer_zeros(L: int, C: int, D: int, acc=torch.float64, device="cpu"):
    return (torch.zeros(L, C, dtype=torch.float64, device=device), torch.zeros(L, C, D, dtype=acc, device=device),
            torch.zeros(L, C, D, D, dtype=acc, device=device))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grouped", [False, True], ids=["own-grouping", "given-grouping"])
def test_layers_of_a_batch_in_one_call_are_each_layers_own_update(impl, device, acc_dtype, grouped):
    """(L, B, T, D) with (L, C, ...) accumulators, over three batches: layer l's statistics are the numpy oracle's of
    layer l's states alone (different states per layer, one mask and one set of labels), with unpooled examples."""
    L, C, D = 3, 4, 9
    acc = layer_zeros(L, C, D, acc_dtype, device)
    seen = []
    for seed in range(3):
        layers = [data(11, 6, D, C, seed=10 * seed + l) for l in range(L)]
        _, mask, labels = layers[0]
        mask[2] = 0  # an example without a pooled token, skipped in every layer
        hidden = torch.stack([h for h, _, _ in layers])
        seen.append((hidden, mask, labels))
        args = (*acc, hidden.to(device), mask.to(device), labels.to(device))
        with_grouping(impl, args, ops.class_grouping(labels.to(device), C)) if grouped else IMPLS[impl](*args)
    tol = dict(rtol=1e-4, atol=1e-3) if acc_dtype == torch.float32 else dict(rtol=1e-9, atol=1e-8)
    for l in range(L):
        h = np.concatenate([hid[l].double().numpy() for hid, _, _ in seen])
        m = np.concatenate([mk.numpy() for _, mk, _ in seen])
        y = np.concatenate([lb.numpy() for _, _, lb in seen])
        for got, want in zip((acc[0][l], acc[1][l], acc[2][l]), numpy_stats(h, m, y, C)):
            torch.testing.assert_close(got.cpu().double(), torch.from_numpy(want), **tol)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_layers_of_pooled_states_are_the_update_of_the_hidden_states(impl):
    """The capture's path: each layer pooled by class_stats_pool into (L, B, D), then one update of (L, B, 1, D) with
    the mask 'has a pooled token' (B, 1): the statistics of one update per layer on the hidden states."""
    L, C, D = 4, 3, 7
    hidden, mask, labels = data(9, 5, D, C, seed=2)
    mask[4] = 0
    hidden = torch.stack([hidden * (l + 1) + l for l in range(L)])
    pooled = torch.empty(L, 9, D, dtype=torch.float64)
    pool = ops.class_stats_pool if impl == "kernel" else ops.class_stats_pool_ref
    for l in range(L):
        pool(pooled[l], hidden[l], mask)
    got = layer_zeros(L, C, D)
    IMPLS[impl](*got, pooled.unsqueeze(2), (mask != 0).any(1, keepdim=True), labels)
    for l in range(L):
        want = zeros(C, D)
        ops.class_stats_update_ref(*want, hidden[l], mask, labels)
        for x, y in zip((got[0][l], got[1][l], got[2][l]), want):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_layers_bad_input(impl):
    L, C, D = 2, 2, 4
    hidden, mask, labels = data(4, 3, D, C)
    hidden = torch.stack([hidden, hidden])
    err = (ValueError, RuntimeError)
    count, mean, m2 = layer_zeros(L, C, D)
    with pytest.raises(err, match=r"count must be \(L, C\)"):
        IMPLS[impl](count[0], mean, m2, hidden, mask, labels)
    with pytest.raises(err, match="count must be"):
        IMPLS[impl](torch.zeros(L + 1, C, dtype=torch.float64), mean, m2, hidden, mask, labels)
    with pytest.raises(err, match=r"m2 must be \(L, C, D, D\)"):
        IMPLS[impl](count, mean, m2[:, :, :, :3], hidden, mask, labels)
    with pytest.raises(err, match="mean must be"):
        IMPLS[impl](count, mean[0], m2, hidden, mask, labels)
    with pytest.raises(err, match="hidden must be"):
        IMPLS[impl](count, mean, m2, hidden.unsqueeze(0), mask, labels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32])
def test_pool_matches_a_loop(device, dtype, out_dtype):
    """class_stats_pool (the wrapper's backend) and its twin against a per-example loop in float64: masked means,
    zero rows for examples without a pooled token, columns past one 64-feature block."""
    hidden, mask, _ = data(7, 9, 70, 2, seed=5, dtype=dtype)
    mask[3] = 0
    want = torch.zeros(7, 70, dtype=torch.float64)
    for b in range(7):
        sel = mask[b] != 0
        if sel.any():
            want[b] = hidden[b][sel].double().mean(0)
    for pool in (ops.class_stats_pool, ops.class_stats_pool_ref):
        got = torch.full((7, 70), float("nan"), dtype=out_dtype, device=device)
        pool(got, hidden.to(device), mask.to(device))
        tol = dict(rtol=1e-6, atol=1e-5) if out_dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.cpu().double(), want, **tol)


def test_pool_empty_batch_and_bad_input():
    hidden, mask, _ = data(4, 3, 5, 2)
    err = (ValueError, RuntimeError)
    for pool in (ops.class_stats_pool, ops.class_stats_pool_ref):
        pool(torch.empty(0, 5, dtype=torch.float64), torch.randn(0, 3, 5), torch.ones(0, 3))
        with pytest.raises(err, match="pooled must be"):
            pool(torch.empty(4, 6, dtype=torch.float64), hidden, mask)
        with pytest.raises(err, match="pooled must be"):
            pool(torch.empty(4, 5, dtype=torch.float16), hidden, mask)
        with pytest.raises(err, match="pool_mask"):
            pool(torch.empty(4, 5, dtype=torch.float64), hidden, mask[:, :2])
        with pytest.raises(err, match="hidden must be"):
            pool(torch.empty(4, 5, dtype=torch.float64), hidden[0], mask)


@pytest.mark.skipif(not HAS_KERNEL, reason="compiled extension not loaded")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_layers_and_pool(device):
    L, C, D = 2, 3, 5
    hidden, mask, labels = data(6, 4, D, C)
    hidden, mask, labels = torch.stack([hidden, hidden + 1]).to(device), mask.to(device), labels.to(device)
    torch.library.opcheck(torch.ops.fastsel.class_stats_update.default, (*layer_zeros(L, C, D, device=device), hidden,
                                                                         mask, labels, *ops.class_grouping(labels, C)))
    for out_dtype in (torch.float64, torch.float32):
        torch.library.opcheck(torch.ops.fastsel.class_stats_pool.default,
                              (torch.empty(6, D, dtype=out_dtype, device=device), hidden[0], mask))
