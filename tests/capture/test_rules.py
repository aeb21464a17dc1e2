"""Each per-layer rule against the per-example oracle: for each example b, torch.autograd.grad of
sum(module(x_b) * g_b) with respect to the module's own parameters, squared, summed over b."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from fastsel.capture import rules
from fastsel.capture.per_example import SquaredGradAccumulator
from fastsel.capture.rules import (
    GENERIC,
    RMS_NORM,
    EmbeddingRule,
    FeatureRule,
    GenericRule,
    LayerNormRule,
    LinearRule,
    RMSNormRule,
    Rule,
    recognise_rms_norm,
    register_rule,
    rule_for,
)


def oracle(module: nn.Module, calls: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """calls: [(x (B, ...), g (B, *out)), ...], several calls of the module on the same B examples: the
    per-example gradient of sum_calls sum(module(x_b) * g_b), squared, summed over b (float64)."""
    params = dict(module.named_parameters(recurse=False))
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for b in range(calls[0][0].shape[0]):
        loss = sum((module(x[b : b + 1]) * g[b : b + 1]).sum() for x, g in calls)
        for n, gr in zip(params, torch.autograd.grad(loss, list(params.values()))):
            want[n] += gr.double().square()
    return want


def run_rule(rule: Rule, module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in module.named_parameters(recurse=False)}
    rule.accumulate(module, x, g, acc)
    return acc


def check(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert set(got) == set(want)
    for n in want:
        assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-6 * float(want[n].abs().max()) + 1e-9, msg=lambda m: f"{n}: {m}")


def grads_like(module: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.randn_like(module(x).float())


# -- Linear -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (5, 4, 7), (3, 2, 4, 7)], ids=["BF", "BTF", "BSTF"])
def test_linear_rule(bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(7, 3, bias=bias)
    x = torch.randn(shape)
    g = grads_like(lin, x)
    assert isinstance(rule_for(lin), LinearRule)
    check(run_rule(rule_for(lin), lin, x, g), oracle(lin, [(x, g)]))


def test_linear_rule_combines_two_calls_by_concatenating_positions():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    x1, x2 = torch.randn(5, 3, 6), torch.randn(5, 2, 6)
    g1, g2 = grads_like(lin, x1), grads_like(lin, x2)
    rule = rule_for(lin)
    phi = torch.cat([rule.features(lin, x).reshape(5, -1, 6) for x in (x1, x2)], 1)
    g = torch.cat([g1, g2], 1)
    acc = {n: torch.zeros_like(p) for n, p in lin.named_parameters()}
    rule.accumulate_features(lin, phi, g, acc)
    check(acc, oracle(lin, [(x1, g1), (x2, g2)]))


@pytest.mark.parametrize("shape", [(5, 7), (5, 4, 7)], ids=["BF", "BTF"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rule_accumulates_linears_on_one_input_in_one_call(monkeypatch, shape, dtype):
    """Three Linears of different widths on one input (one without a bias): the weights in one linear-op call and
    the biases in one norm-op call (over every member's gradient; the bias-free one's part dropped), each layer's
    sums the float64 oracle's, added to what the sums held."""
    torch.manual_seed(0)
    layers = [nn.Linear(7, 3), nn.Linear(7, 5, bias=False), nn.Linear(7, 2)]
    x = torch.randn(shape).to(dtype)
    grads = [grads_like(lin, x.float()).to(dtype) for lin in layers]
    accs = [{n: torch.full_like(p, 0.5) for n, p in lin.named_parameters()} for lin in layers]
    calls = {"linear": [], "norm": []}
    real_linear, real_norm = rules.ops.accumulate_linear_sq_grad, rules.ops.accumulate_norm_sq_grad
    monkeypatch.setattr(rules.ops, "accumulate_linear_sq_grad",
                        lambda out, g, x, **kw: (calls["linear"].append(tuple(out.shape)), real_linear(out, g, x, **kw)))
    monkeypatch.setattr(rules.ops, "accumulate_norm_sq_grad",
                        lambda out, g, x, **kw: (calls["norm"].append(tuple(out.shape)), real_norm(out, g, x, **kw)))
    LinearRule().accumulate_shared_input(x, grads, accs)
    assert calls == {"linear": [(10, 7)], "norm": [(10,)]}
    for lin, g, acc in zip(layers, grads, accs):
        want = oracle(lin.double(), [(x.double(), g.double())])
        check({n: a - 0.5 for n, a in acc.items()}, want)


def test_linear_rule_shared_input_with_one_member_is_the_plain_call():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    x = torch.randn(5, 3, 6)
    g = grads_like(lin, x)
    acc = {n: torch.zeros_like(p) for n, p in lin.named_parameters()}
    LinearRule().accumulate_shared_input(x, [g], [acc])
    check(acc, oracle(lin, [(x, g)]))


# -- LayerNorm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["affine", "no-bias", "two-dims"])
def test_layer_norm_rule(kind):
    torch.manual_seed(0)
    ln = {"affine": lambda: nn.LayerNorm(8), "no-bias": lambda: nn.LayerNorm(8, bias=False),
          "two-dims": lambda: nn.LayerNorm((3, 8), eps=1e-3)}[kind]()
    with torch.no_grad():
        for p in ln.parameters():
            p.normal_()
    x = torch.randn(5, 4, *ln.normalized_shape) * 3 + 1
    g = grads_like(ln, x)
    assert isinstance(rule_for(ln), LayerNormRule)
    check(run_rule(rule_for(ln), ln, x, g), oracle(ln, [(x, g)]))


def test_layer_norm_rule_combines_two_calls():
    torch.manual_seed(0)
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
    x1, x2 = torch.randn(4, 3, 8), torch.randn(4, 5, 8)
    g1, g2 = grads_like(ln, x1), grads_like(ln, x2)
    rule = rule_for(ln)
    phi = torch.cat([rule.features(ln, x).reshape(4, -1, 8) for x in (x1, x2)], 1)
    acc = {n: torch.zeros_like(p) for n, p in ln.named_parameters()}
    rule.accumulate_features(ln, phi, torch.cat([g1, g2], 1), acc)
    check(acc, oracle(ln, [(x1, g1), (x2, g2)]))


# -- Embedding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_rule_with_repeated_tokens(padding_idx):
    torch.manual_seed(0)
    emb = nn.Embedding(6, 4, padding_idx=padding_idx)
    idx = torch.tensor([[1, 1, 2, 0], [3, 0, 0, 3], [5, 5, 5, 5]])  # repeats within an example add up first
    g = grads_like(emb, idx)
    assert isinstance(rule_for(emb), EmbeddingRule)
    got = run_rule(rule_for(emb), emb, idx, g)
    check(got, oracle(emb, [(idx, g)]))
    if padding_idx is not None:
        assert not got["weight"][padding_idx].any()


# -- RMSNorm-style norms ----------------------------------------------------------------------------


class LlamaLikeRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, h: Tensor) -> Tensor:
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


@pytest.mark.parametrize("make", [lambda: nn.RMSNorm(8, eps=1e-3), lambda: nn.RMSNorm((2, 8)), lambda: LlamaLikeRMSNorm(8, 1e-5)],
                         ids=["nn.RMSNorm", "two-dims", "llama"])
def test_rms_norm_rule(make):
    torch.manual_seed(0)
    norm = make()
    with torch.no_grad():
        norm.weight.normal_()
    assert rule_for(norm) is GENERIC  # recognised by its math, not by class
    spec = recognise_rms_norm(norm)
    assert spec is not None and spec.ndim == norm.weight.dim()
    assert rule_for(norm) is RMS_NORM and isinstance(RMS_NORM, RMSNormRule)
    x = torch.randn(5, 3, *norm.weight.shape) * torch.rand(5, 1, *([1] * norm.weight.dim())) * 1e-2  # eps matters
    g = grads_like(norm, x)
    check(run_rule(RMS_NORM, norm, x, g), oracle(norm, [(x, g)]))


def test_recognise_rms_norm_rejects_look_alikes():
    class NotRMS(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8))

        def forward(self, h):
            return self.weight * h / (h.abs().mean(-1, keepdim=True) + 1e-6)

    for module in (NotRMS(), nn.Linear(8, 8), nn.Sequential(nn.RMSNorm(8))):
        assert recognise_rms_norm(module) is None
    assert rule_for(NotRMS()) is GENERIC


# -- the generic rule -------------------------------------------------------------------------------


class Gated(nn.Module):
    """No registered rule: two parameters in a non-linear map."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.mix = nn.Parameter(torch.randn(d, d) / 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.mix) * torch.sigmoid(self.scale)


@pytest.mark.parametrize("chunk", [16, 2])
def test_generic_rule(chunk):
    torch.manual_seed(0)
    mod = Gated()
    x = torch.randn(5, 3, 6)
    g = grads_like(mod, x)
    assert rule_for(mod) is GENERIC
    check(run_rule(GenericRule(chunk=chunk), mod, x, g), oracle(mod, [(x, g)]))


def test_generic_per_example_grads_of_a_shared_input():
    """batched=False: one input for the whole batch, per-example output gradients (B, *output.shape)."""
    torch.manual_seed(0)
    mod = Gated()
    s = torch.randn(4, 6)  # the same for every example
    g = torch.randn(5, 4, 6)
    got = GenericRule.per_example_grads(mod, s, g, ["scale", "mix"], batched=False)
    for b in range(5):
        want = torch.autograd.grad((mod(s) * g[b]).sum(), [mod.scale, mod.mix])
        assert_close(got["scale"][b], want[0])
        assert_close(got["mix"][b], want[1])


# -- the registry -----------------------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry for the test (registrations do not leak)."""
    monkeypatch.setattr(rules, "RULES", dict(rules.RULES))
    return rules.RULES


def test_rules_follow_the_mro():
    class MyLinear(nn.Linear):
        pass

    assert rule_for(MyLinear(3, 2)) is rule_for(nn.Linear(3, 2))


def test_register_rule(registry):
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x * self.weight

    @register_rule([Scale])
    class ScaleRule(FeatureRule):
        """x * w: the norm rule with x itself as the feature."""

        calls = 0

        def features(self, module, x):
            type(self).calls += 1
            return x.reshape(-1, 4)

        def grad_width(self, module):
            return 4

        def accumulate_features(self, module, phi, g, acc):
            acc["weight"].add_((phi * g).sum(1).square().sum(0))

    assert isinstance(registry[Scale], ScaleRule) and rule_for(Scale()) is registry[Scale]
    torch.manual_seed(0)
    mod = Scale()
    x = torch.randn(5, 3, 4)
    g = grads_like(mod, x)
    check(run_rule(rule_for(mod), mod, x, g), oracle(mod, [(x, g)]))

    # the engine uses it, and the result is the per-example loop's
    model = nn.ModuleDict({"scale": mod, "fc": nn.Linear(4, 2)})
    acc = SquaredGradAccumulator(model)
    ScaleRule.calls = 0
    with acc.capture(batch_size=5):
        acc.backward([model["fc"](model["scale"](x)).sum((1, 2))])
    assert ScaleRule.calls == 1
    want = oracle(mod, [(x, model["fc"].weight.sum(0).detach().expand(5, 3, 4))])
    check({"weight": acc.sums["scale.weight"]}, want)


def test_a_later_registration_replaces(registry):
    @register_rule(nn.Linear)
    class Other(GenericRule):
        pass

    assert isinstance(rule_for(nn.Linear(2, 2)), Other)
