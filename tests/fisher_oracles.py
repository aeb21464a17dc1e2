"""Shared Fisher oracles: the per-example loop (batch of one, plain autograd, no hooks) and a tolerance-aware
comparison of two diagonals.

The oracle's likelihood terms are written here from their definitions, not imported from fastsel.scores.fisher:

- categorical, empirical: log p(y | x) = log_softmax(logits)[y], y the gold label;
- categorical, sampled:   the same with y ~ p(. | x), drawn by inverse CDF from the documented counter-based
  uniform of the example (splitmix64 keyed by (seed, 2 * index + 1), see ``uniforms``); tests/scores/
  test_fisher_sampling.py checks statistically that fastsel's draws follow p and the normal law, so the two
  implementations of the draw are not merely equal but right;
- categorical, exact:     sum_c p_c (d log p_c)^2, as C separate terms sqrt(p_c) log p_c (p_c held constant):
  C backward passes instead of fastsel's C - 1 eigen-directions;
- Gaussian (one output f, unit variance): log N(y; f, 1) = -(y - f)^2 / 2 + const with y the gold label
  (empirical), y = f + eps, eps ~ N(0, 1) by Box-Muller from the example's two uniforms (sampled), and for
  exact E_y (y - f)^2 (df)^2 = (df)^2, the term f itself.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.testing import assert_close

_M64 = 1 << 64
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def uniforms(seed: int, index: int) -> tuple[float, float]:
    """The two uniforms in (0, 1) of example ``index`` under ``seed``: splitmix64's output function applied to the
    counter key seed * 0x9E3779B97F4A7C15 + (2 * index + stream + 1) * 0xBF58476D1CE4E5B9 (mod 2^64) of streams
    0 and 1, its top 53 bits mapped to the centre of their cell."""
    out = []
    for stream in (0, 1):
        x = (seed * 0x9E3779B97F4A7C15 + (2 * index + stream + 1) * 0xBF58476D1CE4E5B9) % _M64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % _M64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % _M64
        x = x ^ (x >> 31)
        out.append(((x >> 11) + 0.5) / 2.0**53)
    return out[0], out[1]


def sampled_class(probs: torch.Tensor, u: float) -> int:
    """Inverse CDF: the first class c with p_0 + ... + p_c >= u * (p_0 + ... + p_{C-1})."""
    p = [float(v) for v in probs]
    target, total = u * math.fsum(p), 0.0
    for c, pc in enumerate(p):
        total += pc
        if total >= target:
            return c
    return len(p) - 1


def oracle_terms(logits: torch.Tensor, label: torch.Tensor | None, mode: str, seed: int, index: int) -> list[torch.Tensor]:
    """The terms of one example (logits (1, C)) whose squared gradients sum to its Fisher contribution."""
    if logits.shape[-1] == 1:  # regression: unit-variance Gaussian
        f = logits.float().reshape(-1)[0]
        if mode == "empirical":
            y = label.float().reshape(-1)[0]
        elif mode == "sampled":
            u0, u1 = uniforms(seed, index)
            y = f.detach() + math.sqrt(-2.0 * math.log(u0)) * math.cos(2.0 * math.pi * u1)
        elif mode == "exact":
            return [f]
        else:
            raise ValueError(mode)
        return [-((y - f) ** 2) / 2]
    logp = torch.log_softmax(logits.float().reshape(-1), dim=0)
    if mode == "empirical":
        return [logp[int(label.reshape(-1)[0])]]
    if mode == "sampled":
        y = sampled_class(logp.detach().double().exp(), uniforms(seed, index)[0])
        return [logp[y]]
    if mode == "exact":
        p = logp.detach().exp()
        return [p[c].sqrt() * logp[c] for c in range(logp.shape[0])]
    raise ValueError(mode)


def oracle_fisher(model: nn.Module, batch: dict, mode: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """(1/N) sum_i (d term_i)^2, one unpadded example at a time, plain autograd; example b has index b."""
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    B = batch["input_ids"].shape[0]
    for b in range(B):
        length = int(batch["attention_mask"][b].sum())
        inputs = {k: batch[k][b : b + 1, :length] for k in _INPUTS if k in batch}
        logits = model(**inputs).logits
        label = batch["labels"][b] if "labels" in batch else None
        for term in oracle_terms(logits, label, mode, seed, b):
            grads = torch.autograd.grad(term, list(params.values()), retain_graph=True, allow_unused=True)
            for name, g in zip(params, grads):
                if g is not None:
                    sums[name] += g.double().square()
    return {n: (s / B).float() for n, s in sums.items()}


def assert_diagonals_close(got: dict, want: dict, rtol: float = 1e-4) -> None:
    assert set(got) == set(want)
    largest = max(float(w.abs().max()) for w in want.values())
    for name in want:
        # atol relative to the tensor's scale, with a floor far below the model's largest entry: some
        # entries (the attention key bias) are exactly zero in theory and round-off noise in practice
        scale = float(want[name].abs().max())
        atol = 1e-6 * scale + 1e-12 * largest
        assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
