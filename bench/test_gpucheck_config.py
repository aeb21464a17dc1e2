"""bench/gpucheck/config.py: the dry configuration has every setting of the full one, at a size a CPU runs."""
from __future__ import annotations

from gpucheck.config import make_config


def test_dry_and_full_configs_have_the_same_settings():
    dry, full = make_config(True), make_config(False)
    assert dry.keys() == full.keys() and dry["budget"].keys() == full["budget"].keys()
    assert dry["bert"].keys() == full["bert"].keys()
    assert dry["gemm_n"] < full["gemm_n"] and dry["bert"]["hidden_size"] < full["bert"]["hidden_size"]
    # the linear and error sections read their shapes as (O, I) pairs
    assert all(len(s) == 2 for shapes in dry["linear_shapes"].values() for s in shapes)
