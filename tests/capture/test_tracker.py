"""The shared-parameter tracker on its own: what it follows, where it captures a broadcast to the batch, what it
taints, and that a captured broadcast's gradient gives the exact per-example gradients (per-example oracle)."""
from __future__ import annotations

import torch
from torch import nn
from torch.testing import assert_close

from fastsel.capture.tracker import Frame, SharedTracker

B = 4


def make(T: int = 3, d: int = 5):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(T, d))
    return p, SharedTracker({"table": p}, B)


def test_computations_from_parameters_alone_stay_shared():
    p, tr = make()
    with tr:
        s = torch.tanh(p * 2)
        meta = s.shape, s.detach()
    assert tr.is_shared(s) and not tr.is_shared(meta[1])
    assert not tr.captures and not tr.tainted
    assert tr.direct == {"table"}  # read outside any module call


def test_explicit_expand_to_the_batch_is_captured():
    p, tr = make()
    x = torch.randn(B, 3, 5, requires_grad=True)
    with tr:
        s = torch.sigmoid(p)
        t = s.unsqueeze(0).expand(B, -1, -1)
        y = t * x
    (cap,) = tr.captures
    assert cap.expanded.shape == (B, 3, 5) and cap.shared.shape == (1, 3, 5)
    assert_close(y, torch.sigmoid(p).detach() * x)
    assert not tr.tainted


def test_repeat_to_the_batch_is_captured_example_major():
    """DeBERTa's pattern: (heads, R, dh) repeated to (B * heads, R, dh)."""
    p, tr = make(T=2)
    with tr:
        r = p.view(2, 1, 5).repeat(B, 1, 1)
    (cap,) = tr.captures
    assert r.shape == (B * 2, 1, 5)
    assert cap.expanded.reshape(B, *cap.shared.shape).shape == (B, 2, 1, 5)


def test_implicit_broadcast_in_an_elementwise_op_is_made_explicit():
    p, tr = make()
    x = torch.randn(B, 3, 5, requires_grad=True)
    with tr:
        y = x + torch.cos(p)
    (cap,) = tr.captures
    assert cap.expanded.shape == (B, 3, 5)
    assert_close(y, x + torch.cos(p).detach())
    assert not tr.is_shared(y)


def test_any_other_meeting_with_the_examples_taints():
    p, tr = make(T=5)
    x = torch.randn(B, 3, 5, requires_grad=True)
    with tr:
        y = x @ (p / 3)
    assert tr.tainted == {"table"} and not tr.captures
    assert not tr.is_shared(y)


def test_a_modules_own_parameters_in_its_call_on_the_examples_are_left_to_its_rule():
    p, tr = make(T=5)
    x = torch.randn(B, 3, 5, requires_grad=True)
    with tr:
        tr.frames.append(Frame("mod", frozenset({id(p)}), batched=True))
        x @ p
        tr.frames.pop()
    assert not tr.tainted and not tr.direct and not tr.captures


def test_off_for_the_backward():
    p, tr = make()
    tr.active = False
    x = torch.randn(B, 3, 5, requires_grad=True)
    with tr:
        x @ p.T
        x + p
    assert not tr.tainted and not tr.captures and not tr.direct


def test_captured_cotangents_give_the_per_example_gradients():
    """y_b = sum(w * tanh(x_b + S)), S = 2 * table: the gradient of the captured broadcast, pulled back through S
    by a batched vector-Jacobian product, is each example's gradient of the table."""
    p, tr = make()
    x = torch.randn(B, 3, 5)
    w = torch.randn(3, 5)
    with tr:
        s = p * 2
        y = (torch.tanh(x.requires_grad_() + s) * w).sum((1, 2))
    (cap,) = tr.captures
    (cot,) = torch.autograd.grad(y.sum(), [cap.expanded], retain_graph=True)
    (got,) = torch.autograd.grad([cap.shared], [p], [cot.reshape(B, *cap.shared.shape)], is_grads_batched=True)
    want = torch.stack([torch.autograd.grad((torch.tanh(x[b] + p * 2) * w).sum(), p)[0] for b in range(B)])
    assert_close(got, want)
    assert_close(got.square().sum(0), want.square().sum(0))
