"""What the GPU check measures and how long it may spend on it: the full (GPU, BERT-base / BERT-large shapes)
and the dry (CPU, tiny shapes: only exercises the code) configuration, and the dtype names used throughout."""
from __future__ import annotations

from typing import Any

import torch

from .harness import MiB


def make_config(dry: bool) -> dict[str, Any]:
    if dry:
        return {
            "gemm_n": 256, "copy_bytes": 16 * MiB,
            "linear_shapes": {"tiny": [(64, 48), (48, 72)]}, "linear_B": [2, 4], "linear_T": [8, 16],
            "linear_dtypes": ["bf16", "fp32"], "linear_rep_ms": 5.0, "linear_max_rounds": 2, "slow_s": 5.0,
            "mixed_shape": (2, 16, 64, 48),
            "error_shapes": [(64, 48), (48, 72)], "error_BT": (4, 16),
            "bert": dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vocab_size=1000,
                         batch_size=4, seq_len=16),
            "fisher_rounds": 2, "peer_reps": 1, "layer_tol": 0.05,
            "var_batches": 2, "var_rounds": 2, "var_layer": 1,
            "budget": {"gemm": 10, "linear": 30, "error": 10, "fisher": 60, "variability": 20, "profile": 20},
        }
    return {
        "gemm_n": 8192, "copy_bytes": 1 << 30,
        "linear_shapes": {"bert-base": [(768, 768), (3072, 768), (768, 3072)],
                          "bert-large": [(1024, 1024), (4096, 1024), (1024, 4096)]},
        "linear_B": [8, 32, 128], "linear_T": [128, 512], "linear_dtypes": ["bf16", "fp32"],
        "linear_rep_ms": 20.0, "linear_max_rounds": 50, "slow_s": 0.5,
        "mixed_shape": (32, 128, 3072, 768),
        "error_shapes": [(768, 768), (3072, 768), (768, 3072)], "error_BT": (32, 128),
        "bert": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, vocab_size=30522,
                     batch_size=32, seq_len=128),
        "fisher_rounds": 10, "peer_reps": 2, "layer_tol": 0.05,
        "var_batches": 8, "var_rounds": 5, "var_layer": 6,
        "budget": {"gemm": 15, "linear": 80, "error": 15, "fisher": 90, "variability": 30, "profile": 20},
    }


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
