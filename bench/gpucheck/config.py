"""What the GPU check measures and how long it may spend on it: the full (GPU, BERT-base / BERT-large shapes)
and the dry (CPU, tiny shapes: only exercises the code) configuration, and the dtype names used throughout.

``budget`` is each section's share of bench/gpu_check.py's time (seconds; a section past its share records what
it skipped). The full shares are estimates for an H100 and must fit in the bench step's estimate of
bench/gpu_check.sh (``EST_bench``, checked by bench/test_gpucheck_budget.py), which with the build, the
tests and the sanitizers keeps a whole ``make gpu-check`` within 8 minutes."""
from __future__ import annotations

from typing import Any

import torch

from .harness import MiB


def make_config(dry: bool) -> dict[str, Any]:
    if dry:
        return {
            "gemm_n": 256, "copy_bytes": 16 * MiB,
            # T 32 and 64: the classes T<=32 and T<=256; triton runs in its interpreter (about a second a call):
            # timed only while one call takes under slow_s, checked on every configuration
            "linear_shapes": {"tiny": [(64, 48), (48, 72)]}, "linear_B": [4], "linear_T": [32, 64],
            "linear_dtypes": ["bf16", "fp16", "fp32"], "linear_rep_ms": 5.0, "linear_max_rounds": 2, "slow_s": 0.1,
            "mixed_shape": (2, 16, 64, 48),
            "error_shapes": [(64, 48), (48, 72)], "error_BT": (4, 16),
            "bert": dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vocab_size=1000,
                         batch_size=4, seq_len=16),
            "fisher_rounds": 2, "peer_reps": 1, "layer_tol": 0.05, "fisher_untimed": ["triton"],
            "var_batches": 2, "var_rounds": 2, "var_layer": 1,
            "pass_B": [2, 4], "pass_examples": 16, "pass_probe_pool": 100, "pass_rounds": 1, "pass_max_length": 16,
            "budget": {"env": 10, "gemm": 10, "linear": 60, "error": 10, "fisher": 60, "fisher_pass": 60,
                       "variability": 20, "profile": 20},
        }
    return {
        "gemm_n": 8192, "copy_bytes": 1 << 30,
        "linear_shapes": {"bert-base": [(768, 768), (3072, 768), (768, 3072)],
                          "bert-large": [(1024, 1024), (4096, 1024), (1024, 4096)]},
        # today's table (6 layer shapes x B x T) plus T in {32, 64} (class T<=32, and T<=256's lower end), in
        # every operand dtype: 216 configurations, each checked then timed in a few interleaved rounds
        "linear_B": [8, 32, 128], "linear_T": [32, 64, 128, 512], "linear_dtypes": ["bf16", "fp16", "fp32"],
        "linear_rep_ms": 8.0, "linear_max_rounds": 15, "slow_s": 0.5,
        "mixed_shape": (32, 128, 3072, 768),
        "error_shapes": [(768, 768), (3072, 768), (768, 3072)], "error_BT": (32, 128),
        "bert": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, vocab_size=30522,
                     batch_size=32, seq_len=128),
        "fisher_rounds": 10, "peer_reps": 2, "layer_tol": 0.05, "fisher_untimed": [],
        "var_batches": 8, "var_rounds": 5, "var_layer": 6,
        # fisher_pass: `fastsel score` in-process on a BERT-base folder (random weights) and a CSV of pass_examples
        # rows to score plus pass_probe_pool more (the default head's probe fits on those), T = pass_max_length
        "pass_B": [32, 128], "pass_examples": 512, "pass_probe_pool": 256, "pass_rounds": 1, "pass_max_length": 128,
        # H100 estimates (s): the first Triton calls autotune and compile (no Triton cache on a fresh machine:
        # TRITON_CACHE_DIR under runs/ can be carried to the next run), about half of linear's share
        "budget": {"env": 5, "gemm": 8, "linear": 95, "error": 7, "fisher": 30, "fisher_pass": 55,
                   "variability": 12, "profile": 8},
    }


# seconds of bench/gpu_check.py outside the sections (interpreter start, imports of torch, transformers, fastsel)
STARTUP_S = 15

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
