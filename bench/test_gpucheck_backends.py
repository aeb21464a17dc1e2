"""bench/gpucheck/backends.py: the FASTSEL_BACKEND override is set for the block and restored after it."""
from __future__ import annotations

import os

import pytest
import torch
from gpucheck.backends import LINEAR_ENV, autocast, linear_backend_env, linear_variants


def test_linear_backend_env_sets_and_restores(monkeypatch):
    monkeypatch.delenv("FASTSEL_BACKEND", raising=False)
    with linear_backend_env("bmm"):
        assert os.environ["FASTSEL_BACKEND"] == f"{LINEAR_ENV}=bmm"
    assert "FASTSEL_BACKEND" not in os.environ
    monkeypatch.setenv("FASTSEL_BACKEND", "other=x")
    with pytest.raises(RuntimeError), linear_backend_env("bmm"):
        raise RuntimeError("a failing call still restores it")
    assert os.environ["FASTSEL_BACKEND"] == "other=x"
    with linear_backend_env(None):  # None: the default, untouched
        assert os.environ["FASTSEL_BACKEND"] == "other=x"


def test_variants_leave_out_the_reference_and_autocast_is_bf16():
    assert "reference" not in linear_variants(torch.device("cpu"))
    with autocast(torch.device("cpu")):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), enabled=False):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
