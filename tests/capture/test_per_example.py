"""The per-example backend on plain torch modules: RMSNorm-style rules, and batch-shared computations
captured where they meet the examples (no per-example backward), against a per-example loop."""
from __future__ import annotations

import pytest
import torch
from fisher_oracles import assert_diagonals_close
from torch import nn

from fastsel.capture.per_example import SquaredGradAccumulator
from fastsel.capture.rules import GENERIC, RMS_NORM, rule_for


def _check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, forward) -> SquaredGradAccumulator:
    """forward(x) -> logits (B, C); compares acc.mean() with a loop over single examples."""

    def terms(xb, yb):
        return [torch.log_softmax(forward(xb), -1).gather(1, yb[:, None]).squeeze(1)]

    B = x.shape[0]
    acc = SquaredGradAccumulator(model)
    with acc.capture(batch_size=B):
        acc.backward(terms(x, y))
    params = dict(model.named_parameters())
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(B):
        grads = torch.autograd.grad(terms(x[b : b + 1], y[b : b + 1])[0].sum(), list(params.values()), allow_unused=True)
        for n, g in zip(want, grads):
            if g is not None:
                want[n] += g.square()
    assert_diagonals_close(acc.mean(), {n: w / B for n, w in want.items()})
    return acc


# -- RMSNorm-style norms: a native rule, recognised by the math ---------------------------------------


class LlamaLikeRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class OffsetRMSNorm(nn.Module):
    """Gemma-style: (1 + weight) * x_hat, eps under an unusual attribute name."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.epsilon = 1e-5

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.epsilon) * (1.0 + self.weight.float())).type_as(h)


class NotRMSNorm(nn.Module):
    """One weight, but a different normalisation: must stay on the generic rule."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.weight * h / (h.abs().mean(-1, keepdim=True) + 1e-6)


NORMS = {
    "nn.RMSNorm": lambda: nn.RMSNorm(8),
    "nn.RMSNorm-eps": lambda: nn.RMSNorm(8, eps=1e-3),
    "llama": lambda: LlamaLikeRMSNorm(8),
    "llama-eps-1e-5": lambda: LlamaLikeRMSNorm(8, eps=1e-5),
    "offset": lambda: OffsetRMSNorm(8),
}


@pytest.mark.parametrize("kind", list(NORMS))
def test_rms_norm_rule_matches_the_loop(kind):
    torch.manual_seed(0)
    norm = NORMS[kind]()
    with torch.no_grad():
        norm.weight.normal_()
    fc = nn.Linear(8, 3)
    model = nn.ModuleDict({"norm": norm, "fc": fc})
    acc = SquaredGradAccumulator(model)
    assert rule_for(norm) is RMS_NORM
    x = torch.randn(6, 5, 8) * torch.rand(6, 1, 1) * 1e-2  # small inputs: eps matters
    _check(model, x, torch.randint(0, 3, (6,)), lambda xb: fc(norm(xb)).mean(1))
    assert not acc.fallback_params


def test_rms_norm_over_two_dims():
    torch.manual_seed(0)
    norm = nn.RMSNorm((4, 8), eps=1e-4)
    with torch.no_grad():
        norm.weight.normal_()
    fc = nn.Linear(32, 2)
    model = nn.ModuleDict({"norm": norm, "fc": fc})
    SquaredGradAccumulator(model)
    assert rule_for(norm) is RMS_NORM
    _check(model, torch.randn(5, 3, 4, 8), torch.randint(0, 2, (5,)), lambda xb: fc(norm(xb).flatten(2)).mean(1))


def test_a_look_alike_stays_generic():
    torch.manual_seed(0)
    norm = NotRMSNorm(8)
    fc = nn.Linear(8, 3)
    model = nn.ModuleDict({"norm": norm, "fc": fc})
    SquaredGradAccumulator(model)
    assert rule_for(norm) is GENERIC
    _check(model, torch.randn(5, 4, 8), torch.randint(0, 3, (5,)), lambda xb: fc(norm(xb)).mean(1))


def test_layer_norm_rule_with_and_without_bias():
    torch.manual_seed(0)
    ln1, ln2, fc = nn.LayerNorm(8), nn.LayerNorm(8, bias=False), nn.Linear(8, 3)
    with torch.no_grad():
        ln1.weight.normal_(), ln2.weight.normal_(), ln1.bias.normal_()
    model = nn.ModuleDict({"ln1": ln1, "ln2": ln2, "fc": fc})
    _check(model, torch.randn(5, 4, 8) * 3 + 1, torch.randint(0, 3, (5,)), lambda xb: fc(ln2(torch.tanh(ln1(xb)))).mean(1))


def test_layer_norm_rule_takes_weight_and_bias_in_one_op_call(monkeypatch):
    """A LayerNorm over the last dim: one call of the LayerNorm op per call of the module, both parameters at once
    (only the trainable ones); over two trailing dims, x_hat features and the scale/bias op. Both match the loop."""
    from fastsel import ops

    torch.manual_seed(0)
    calls: list[tuple[bool, bool]] = []
    real = ops.accumulate_layer_norm_sq_grad

    def spy(w, b, g, x, eps):
        calls.append((w is not None, b is not None))
        real(w, b, g, x, eps)

    monkeypatch.setattr(ops, "accumulate_layer_norm_sq_grad", spy)
    ln1, ln2, ln3, fc = nn.LayerNorm(8), nn.LayerNorm(8, bias=False), nn.LayerNorm((4, 8)), nn.Linear(8, 3)
    with torch.no_grad():
        for p in (ln1.weight, ln1.bias, ln2.weight, ln3.weight, ln3.bias):
            p.normal_()
    model = nn.ModuleDict({"ln1": ln1, "ln2": ln2, "ln3": ln3, "fc": fc})
    _check(model, torch.randn(5, 4, 8) * 3 + 1, torch.randint(0, 3, (5,)),
           lambda xb: fc(ln3(ln2(torch.tanh(ln1(xb))))).mean(1))
    assert sorted(calls) == [(True, False), (True, True)]  # ln2 has no bias; ln3 (two dims) takes the other path
    calls.clear()
    acc = SquaredGradAccumulator(model, [n for n, _ in model.named_parameters() if n != "ln1.bias"])
    with acc.capture(batch_size=5):
        acc.backward([fc(ln3(ln2(torch.tanh(ln1(torch.randn(5, 4, 8)))))).mean(1)[:, 0]])
    assert sorted(calls) == [(True, False), (True, False)]  # ln1's bias not asked for: not accumulated


# -- batch-shared computations --------------------------------------------------------------------------


class Table(nn.Module):
    """Holds parameters that its owner reads directly (never called), like DeBERTa's rel_embeddings."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*shape))


class SharedBias(nn.Module):
    """A position table run through a LayerNorm and a Linear once per batch, then added to every example
    by implicit broadcasting (the pattern of relative/absolute position encodings computed once)."""

    def __init__(self, T: int = 5, d: int = 8) -> None:
        super().__init__()
        self.table = Table(T, d)
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)  # also applied to the examples: its two uses combine per example
        self.fc = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.proj(self.norm(self.table.weight))  # (T, d), the same for every example
        h = torch.tanh(self.proj(x) + pos)  # implicit broadcast to (B, T, d)
        return self.fc(h * pos).mean(1)  # and a second meeting, by mul


class SharedRepeat(nn.Module):
    """DeBERTa's pattern: a shared (heads, R, dh) tensor repeated to (B * heads, R, dh) for a bmm."""

    def __init__(self, d: int = 8, heads: int = 2, R: int = 6) -> None:
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.rel = nn.Embedding(R, d)  # its weight is read directly, never called
        self.q = nn.Linear(d, d)
        self.fc = nn.Linear(R, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q = self.q(x).view(B, T, self.heads, self.dh).transpose(1, 2).reshape(B * self.heads, T, self.dh)
        r = self.q(self.rel.weight.unsqueeze(0))  # shared, and q is used twice
        r = r.view(1, -1, self.heads, self.dh).transpose(1, 2).reshape(self.heads, -1, self.dh)
        r = r.repeat(B, 1, 1)
        scores = torch.bmm(q, r.transpose(1, 2))  # (B*heads, T, R)
        return self.fc(scores.view(B, self.heads, T, -1).mean((1, 2)))


class SharedExpand(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.gate = Table(4, d)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate.weight).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, 4, d)
        h = torch.sigmoid(self.gate.weight)[None, :, :1].expand_as(x[:, :4, :])  # (B, 4, d), shape from x
        g = g * h
        return self.fc(torch.bmm(g, x.transpose(1, 2)).transpose(1, 2)).mean(1)  # (B, T, 4) -> (B, 3)


class Uncaptured(nn.Module):
    """A parameter-derived matrix multiplied with the examples outside any module: not capturable."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.mix = Table(d, d)
        self.fc = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(x @ (self.mix.weight / 3))).mean(1)


@pytest.mark.parametrize("B", [1, 5])
def test_shared_bias_by_implicit_broadcast(B):
    torch.manual_seed(0)
    model = SharedBias()
    acc = _check(model, torch.randn(B, 5, 8), torch.randint(0, 3, (B,)), model)
    assert not acc.fallback_params


@pytest.mark.parametrize("B", [1, 4])
def test_shared_repeat_to_the_batch(B):
    torch.manual_seed(0)
    model = SharedRepeat()
    acc = _check(model, torch.randn(B, 7, 8), torch.randint(0, 3, (B,)), model)
    assert not acc.fallback_params


def test_shared_expand_to_the_batch():
    torch.manual_seed(0)
    model = SharedExpand(d=8)
    x = torch.randn(5, 8, 8)
    acc = _check(model, x, torch.randint(0, 3, (5,)), model)
    assert not acc.fallback_params


def test_own_parameters_of_a_called_module_use_its_rule():
    """Parameters used inside their own module's call on the examples belong to that module's rule
    (here the generic torch.func rule of the whole module), whatever the ops."""
    torch.manual_seed(0)

    class Own(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Parameter(torch.randn(8, 8) / 3)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.tanh(x @ (self.mix * 2))).mean(1)

    model = Own()
    acc = _check(model, torch.randn(5, 4, 8), torch.randint(0, 3, (5,)), model)
    assert not acc.fallback_params


def test_uncaptured_meeting_goes_to_the_exact_fallback():
    torch.manual_seed(0)
    model = Uncaptured()
    acc = _check(model, torch.randn(5, 4, 8), torch.randint(0, 3, (5,)), model)
    assert acc.fallback_params == {"mix.weight"}


def test_several_terms_reuse_the_shared_capture():
    """exact-mode style: several weighted terms on one forward, each with its own per-example cotangents."""
    torch.manual_seed(0)
    model = SharedRepeat()
    x = torch.randn(4, 7, 8)
    acc = SquaredGradAccumulator(model)
    with acc.capture(batch_size=4):
        logp = torch.log_softmax(model(x), -1)
        acc.backward([logp[:, c] for c in range(3)])
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b in range(4):
        lp = torch.log_softmax(model(x[b : b + 1]), -1)
        for c in range(3):
            for n, g in zip(want, torch.autograd.grad(lp[0, c], list(model.parameters()), retain_graph=True)):
                want[n] += g.square()
    assert_diagonals_close(acc.mean(), {n: w / 4 for n, w in want.items()})
    assert not acc.fallback_params


class SharedAndUncaptured(nn.Module):
    """Every path of the engine at once: single calls (hooks), a module with two calls and a directly read table
    (the shared capture), and a parameter on the exact fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.uncaptured = SharedBias(), Uncaptured()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x) + self.uncaptured(x)


@pytest.mark.parametrize("workspace", [None, 1], ids=["one-chunk", "example-chunks"])
def test_groups_on_every_path(workspace, monkeypatch):
    """With groups, each example's squares go to its group's sums only, on every path (the per-example loop per
    group); the shared capture cut into chunks of examples keeps each example in its group."""
    from fastsel.capture import per_example

    if workspace is not None:
        monkeypatch.setattr(per_example, "SHARED_WORKSPACE_BYTES", workspace)
    torch.manual_seed(0)
    model = SharedAndUncaptured()
    x, y = torch.randn(5, 5, 8), torch.randint(0, 3, (5,))
    groups = torch.tensor([1, 0, 1, 2, 0])
    acc = SquaredGradAccumulator(model)
    acc.enable_groups(3)
    with acc.capture(batch_size=5, groups=groups):
        acc.backward([torch.log_softmax(model(x), -1).gather(1, y[:, None]).squeeze(1)])
    assert acc.fallback_params == {"uncaptured.mix.weight"} and not acc.sums_used
    params = dict(model.named_parameters())
    for k in range(3):
        want = {n: torch.zeros_like(p) for n, p in params.items()}
        for b in (groups == k).nonzero().flatten().tolist():
            term = torch.log_softmax(model(x[b : b + 1]), -1)[0, y[b]]
            for n, g in zip(want, torch.autograd.grad(term, list(params.values()))):
                want[n] += g.square()
        assert_diagonals_close(acc.group_sums[k], want)
    assert not any(s.any() for s in acc.sums.values())


# -- hooks kept for a whole pass ------------------------------------------------------------------------


def _hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooked_registers_the_hooks_once_for_many_captures():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    xs, ys = torch.randn(3, 5, 4), torch.randint(0, 3, (3, 5))

    def run(acc: SquaredGradAccumulator) -> dict[str, torch.Tensor]:
        for x, y in zip(xs, ys):
            with acc.capture(batch_size=5):
                acc.backward([torch.log_softmax(model(x), -1).gather(1, y[:, None]).squeeze(1)])
        return acc.mean()

    want = run(SquaredGradAccumulator(model))  # hooks registered per capture
    assert _hook_counts(model) == 0
    acc = SquaredGradAccumulator(model)
    with acc.hooked():
        registered = _hook_counts(model)
        assert registered == 2 * 3  # a pre and a forward hook per module with parameters
        with acc.hooked():  # nested: the outer one holds the hooks
            assert _hook_counts(model) == registered
        model(xs[0])  # a forward outside a capture: the hooks do nothing
        got = run(acc)
        assert _hook_counts(model) == registered  # no capture added any
    assert _hook_counts(model) == 0
    assert_diagonals_close(got, want, rtol=1e-6)


class SharedInputBlock(nn.Module):
    """Q, K and V read one input (as in attention); ``out`` reads its own."""

    def __init__(self, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mixed = torch.tanh(self.q(h)) * self.k(h) + self.v(h)
        return self.out(mixed).mean(1)  # (B, T, d) -> (B, classes)


class UnusedBranch(nn.Module):
    """A Linear on the input whose output the loss never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(8, 3), nn.Linear(8, 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.unused(h * 2)
        return self.used(h).mean(1)


def test_an_output_the_loss_never_reaches_gets_zero_sums():
    """The unused Linear's output is a frontier output the root does not reach: its hook never fires, which the
    backward knows (no 'output not reached' error); its sums stay zero, the rest is the per-example loop's."""
    torch.manual_seed(0)
    model = UnusedBranch()
    h, y = torch.randn(5, 7, 8), torch.randint(0, 3, (5,))
    acc = _check(model, h, y, model)
    assert not any(acc.mean()[n].any() for n in ("unused.weight", "unused.bias"))


class PartlyUnusedBlock(SharedInputBlock):
    """Q, K and V read one input, but the loss never reaches K's output."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.k(h)
        return self.out(torch.tanh(self.q(h)) + self.v(h)).mean(1)


def _linear_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The out shapes of every linear-op call from now on."""
    from fastsel import ops

    shapes: list[tuple[int, ...]] = []
    real = ops.accumulate_linear_sq_grad

    def spy(out, grad_output, input, **kw):
        shapes.append(tuple(out.shape))
        real(out, grad_output, input, **kw)

    monkeypatch.setattr(ops, "accumulate_linear_sq_grad", spy)
    return shapes


@pytest.mark.parametrize("dtype,backend,autocast", [(torch.float32, None, False), (torch.bfloat16, None, False),
                                                    (torch.float32, "bmm", True)])
def test_linears_reading_one_input_accumulate_in_one_call(monkeypatch, dtype, backend, autocast):
    """Q, K and V read one input: one linear-op call for the three (their rows stacked, (3d, d)), one for ``out``;
    the sums are those of a call per layer, and (fp32) the per-example loop's."""
    import fastsel.capture.per_example as per_example

    if backend is not None:
        monkeypatch.setenv("FASTSEL_BACKEND", f"accumulate_linear_sq_grad={backend}")
    torch.manual_seed(0)
    model = SharedInputBlock().to(dtype)
    h, y = torch.randn(5, 7, 8).to(dtype), torch.randint(0, 3, (5,))

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return model(x).float()

    shapes = _linear_calls(monkeypatch)
    if dtype == torch.float32 and not autocast:
        got = _check(model, h, y, forward).mean()
    else:
        acc = SquaredGradAccumulator(model)
        with acc.capture(batch_size=5):
            acc.backward([torch.log_softmax(forward(h), -1).gather(1, y[:, None]).squeeze(1)])
        got = acc.mean()
    assert sorted(shapes) == [(3, 8), (24, 8)]
    shapes.clear()
    monkeypatch.setattr(per_example._SharedInputGroups, "arrive", lambda self, call, grad: None)  # a call per layer
    acc = SquaredGradAccumulator(model)
    with acc.capture(batch_size=5):
        acc.backward([torch.log_softmax(forward(h), -1).gather(1, y[:, None]).squeeze(1)])
    assert sorted(shapes) == [(3, 8), (8, 8), (8, 8), (8, 8)]
    assert_diagonals_close(got, acc.mean(), rtol=1e-6)


def test_linears_on_one_input_whose_loss_misses_one(monkeypatch):
    """K's output never reaches the loss: Q and V, held for K, are accumulated together after the backward (one
    call), K's sums stay zero, and every sum is the per-example loop's."""
    torch.manual_seed(0)
    model = PartlyUnusedBlock()
    h, y = torch.randn(5, 7, 8), torch.randint(0, 3, (5,))
    shapes = _linear_calls(monkeypatch)
    acc = _check(model, h, y, model)
    assert sorted(shapes) == [(3, 8), (16, 8)]
    assert not acc.mean()["k.weight"].any() and not acc.mean()["k.bias"].any()


@pytest.mark.parametrize("terms", [1, 2])
def test_linears_on_one_input_with_groups_and_several_terms(monkeypatch, terms):
    """With confidence groups, each example's squares of Q, K and V (one call per group) go to its group's sums;
    several terms (exact mode) add up: the per-example loop per group."""
    torch.manual_seed(0)
    model = SharedInputBlock()
    h, y = torch.randn(6, 7, 8), torch.randint(0, 3, (6,))
    groups = torch.tensor([1, 0, 1, 2, 0, 0])
    shapes = _linear_calls(monkeypatch)
    acc = SquaredGradAccumulator(model)
    acc.enable_groups(3, [n for n, _ in model.named_parameters() if not n.startswith("out.")])

    def per_term(x: torch.Tensor, yb: torch.Tensor) -> list[torch.Tensor]:
        logp = torch.log_softmax(model(x), -1)
        return [logp.gather(1, ((yb + t) % 3)[:, None]).squeeze(1) for t in range(terms)]

    with acc.capture(batch_size=6, groups=groups):
        acc.backward(per_term(h, y))
    assert shapes.count((24, 8)) == 3 * terms  # one stacked call per group with examples, per term
    params = dict(model.named_parameters())
    for k in range(3):
        want = {n: torch.zeros_like(p) for n, p in params.items() if not n.startswith("out.")}
        for b in (groups == k).nonzero().flatten().tolist():
            for term in per_term(h[b : b + 1], y[b : b + 1]):
                for n, g in zip(params, torch.autograd.grad(term.sum(), list(params.values()), retain_graph=True)):
                    if n in want:
                        want[n] += g.square()
        assert_diagonals_close(acc.group_sums[k], want)


def test_linears_on_one_input_whose_sums_go_to_different_destinations():
    """Only Q's parameters grouped: Q's squares go to its example's group, K's and V's to the plain sums (the members'
    destinations differ, so each is accumulated alone): per group and over all examples, the per-example loop's."""
    torch.manual_seed(0)
    model = SharedInputBlock()
    h, y = torch.randn(6, 7, 8), torch.randint(0, 3, (6,))
    groups = torch.tensor([1, 0, 1, 2, 0, 0])
    acc = SquaredGradAccumulator(model)
    acc.enable_groups(3, ["q.weight", "q.bias"])
    with acc.capture(batch_size=6, groups=groups):
        acc.backward([torch.log_softmax(model(h), -1).gather(1, y[:, None]).squeeze(1)])
    params = dict(model.named_parameters())
    per_example = []
    for b in range(6):
        term = torch.log_softmax(model(h[b : b + 1]), -1)[0, y[b]]
        per_example.append({n: g.square() for n, g in zip(params, torch.autograd.grad(term, list(params.values())))})
    for k in range(3):
        members = (groups == k).nonzero().flatten().tolist()
        assert_diagonals_close(acc.group_sums[k], {n: sum(per_example[b][n] for b in members) for n in ("q.weight", "q.bias")})
    assert_diagonals_close({n: acc.sums[n] for n in ("k.weight", "k.bias", "v.weight", "v.bias")},
                           {n: sum(p[n] for p in per_example) for n in ("k.weight", "k.bias", "v.weight", "v.bias")})
