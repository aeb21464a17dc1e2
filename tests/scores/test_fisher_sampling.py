"""The sampled Fisher draws its labels from the model: y ~ p(. | x) for classification, y = f + eps with
eps ~ N(0, 1) for regression -- tested statistically on many examples (fixed seeds, so deterministic), and each
draw against the oracle's own implementation of the documented counter-based draw (tests/fisher_oracles.py)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from fisher_oracles import sampled_class, uniforms
from scipy import stats
from torch import nn
from torch.testing import assert_close

from fastsel.scores.fisher import fisher_terms_from_logits

N = 20000


def _head(num_labels: int) -> nn.Module:
    """fastsel picks the likelihood from model.config: categorical for C > 1, Gaussian for one output."""
    m = nn.Module()
    m.config = SimpleNamespace(num_labels=num_labels, problem_type=None)
    return m


def _sampled_labels(logits: torch.Tensor, seed: int, first_index=0) -> torch.Tensor:
    """The class of each row that fastsel's sampled term is the log-probability of."""
    (term,) = fisher_terms_from_logits(_head(logits.shape[1]), logits, None, "sampled", seed, first_index)
    logp = torch.log_softmax(logits.float(), -1)
    match = logp == term.detach()[:, None]  # the term is gathered from this very log_softmax
    assert bool((match.sum(1) == 1).all()), "each term must be the log-probability of exactly one class"
    return match.float().argmax(1)


def test_sampled_labels_follow_the_model_distribution():
    """Chi-square goodness of fit of 20000 draws against p (three classes, two different rows of logits)."""
    for p, seed in (([0.6, 0.3, 0.1], 0), ([0.05, 0.15, 0.8], 123)):
        probs = torch.tensor(p)
        y = _sampled_labels(probs.log().expand(N, 3).clone(), seed)
        observed = torch.bincount(y, minlength=3).double()
        expected = probs.double() / probs.double().sum() * N
        assert stats.chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3, observed
        # the test has power: the same counts are far from another distribution and from the argmax
        wrong = expected.flip(0)
        assert stats.chisquare(observed.numpy(), wrong.numpy()).pvalue < 1e-12
        assert observed.max() < 0.95 * N


def test_sampled_labels_are_independent_of_the_gold_labels_and_follow_each_example():
    """Rows with different distributions: each row's draw follows its own p (here p is one-hot-ish per row)."""
    logits = torch.full((600, 4), -30.0)
    target = torch.arange(600) % 4
    logits[torch.arange(600), target] = 0.0  # p(target) = 1 - 3e-13
    assert torch.equal(_sampled_labels(logits, seed=5), target)


def test_each_draw_is_the_documented_counter_based_draw():
    """Example i's label is the inverse CDF of its first uniform (oracle implementation), however it is batched."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 5, generator=g) * 2
    p = torch.softmax(logits.double(), -1)
    for seed in (0, 7, -3):
        want = torch.tensor([sampled_class(p[i], uniforms(seed, 1000 + i)[0]) for i in range(400)])
        assert torch.equal(_sampled_labels(logits, seed, first_index=1000), want)
        order = torch.randperm(400, generator=g)
        shuffled = _sampled_labels(logits[order], seed, first_index=1000 + order)
        assert torch.equal(shuffled, want[order])
    assert not torch.equal(_sampled_labels(logits, 0), _sampled_labels(logits, 1))


def test_uniforms_are_uniform_and_independent_streams():
    u = torch.tensor([uniforms(11, i) for i in range(N)], dtype=torch.float64)
    assert float(u.min()) > 0 and float(u.max()) < 1
    for k in (0, 1):
        assert stats.kstest(u[:, k].numpy(), "uniform").pvalue > 1e-3
    assert abs(float(torch.corrcoef(u.T)[0, 1])) < 0.03  # 4.2 standard errors of 1/sqrt(N)


def test_sampled_regression_target_is_f_plus_standard_normal_noise():
    """Gaussian sampled term -(y - f)^2 / 2 with y = f + eps: its gradient in f is eps, which must be N(0, 1) (KS
    test on 20000 draws) and the oracle's Box-Muller value of the example's uniforms."""
    f = (torch.randn(N, 1, generator=torch.Generator().manual_seed(2)) * 3).requires_grad_(True)
    (term,) = fisher_terms_from_logits(_head(1), f, None, "sampled", seed=4, first_index=0)
    (eps,) = torch.autograd.grad(term.sum(), f)
    eps = eps.reshape(-1).double()
    assert_close(term.detach().double(), -eps.square() / 2, rtol=1e-5, atol=1e-6)
    assert stats.kstest(eps.numpy(), "norm").pvalue > 1e-3
    assert abs(float(eps.mean())) < 4 / N**0.5 and abs(float(eps.var()) - 1) < 0.05
    u = torch.tensor([uniforms(4, i) for i in range(200)], dtype=torch.float64)
    want = torch.sqrt(-2 * torch.log(u[:, 0])) * torch.cos(2 * torch.pi * u[:, 1])
    assert_close(eps[:200], want, rtol=1e-5, atol=1e-5)
