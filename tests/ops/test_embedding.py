"""The embedding op (fastsel.ops.embedding): repeated tokens, padding rows, against a float64 oracle."""
from __future__ import annotations

import pytest
import torch
from oracles import DEVICES, DTYPES, oracle_embedding, tol
from torch.testing import assert_close

from fastsel import ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx", [-1, 0, 3])
def test_embedding_repeated_tokens_and_padding(device, dtype, padding_idx):
    gen = torch.Generator().manual_seed(5)
    V, D = 11, 13
    idx = torch.randint(0, 5, (6, 9), generator=gen)  # small range: many tokens repeat within an example
    g = torch.randn(6, 9, D, generator=gen).to(dtype)
    out, ref = torch.zeros(V, D, device=device), torch.zeros(V, D, device=device)
    ops.accumulate_embedding_sq_grad(out, g.to(device), idx.to(device), padding_idx)
    ops.accumulate_embedding_sq_grad_ref(ref, g.to(device), idx.to(device), padding_idx)
    assert_close(out, ref, **tol(dtype))
    assert_close(out.cpu(), oracle_embedding(g, idx, V, padding_idx), rtol=1e-4, atol=1e-5)
    if padding_idx >= 0:
        assert out[padding_idx].abs().max() == 0
