"""Shared Fisher oracles: the per-example loop (batch of one, plain autograd, no hooks) and a tolerance-aware
comparison of two diagonals."""
from __future__ import annotations

import torch
from torch import nn
from torch.testing import assert_close

from fastsel.scores.fisher import fisher_terms


def oracle_fisher(model: nn.Module, batch: dict, mode: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """(1/N) sum_i (d term_i)^2, one unpadded example at a time, plain autograd."""
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    B = batch["input_ids"].shape[0]
    for b in range(B):
        length = int(batch["attention_mask"][b].sum())
        example = {k: (v[b : b + 1, :length] if v.dim() == 2 else v[b : b + 1]) for k, v in batch.items()}
        for term in fisher_terms(model, example, mode, seed, first_index=b):
            grads = torch.autograd.grad(term.sum(), list(params.values()), retain_graph=True, allow_unused=True)
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
