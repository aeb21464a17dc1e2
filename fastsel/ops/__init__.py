"""The Python face of csrc/: one module per op (typed wrapper, fake kernel, pure-torch ``*_ref`` twin) and the
backend choice (:mod:`fastsel.ops.backend`).

Each wrapper runs the compiled kernel for the tensor's device when the extension has one, and the ``*_ref``
twin otherwise (see ``fastsel info``). The ``*_ref`` twins are also the test oracles.

Shape conventions: B examples, T positions per example (any number of middle dims is flattened into T; a
2-d input is T = 1), O/I/D feature sizes, V embedding rows. Accumulators are float32; inputs may be fp32,
bf16 or fp16 and are accumulated in fp32.

    ops.linear       accumulate_linear_sq_grad (+ _bmm, _ref)       per-example squared weight gradients
    ops.norm         accumulate_norm_sq_grad (+ _ref)               scales and biases
    ops.embedding    accumulate_embedding_sq_grad (+ _ref)          embedding tables
    ops.layer_norm   accumulate_layer_norm_sq_grad (+ _ref)         LayerNorm weight and bias, x_hat inside
    ops.class_stats  class_stats_update (+ _ref), class_grouping    per-class count / mean / scatter (one or L layers)
                     class_stats_pool (+ _ref)                      the pooling stage alone
    ops.backend      extension loading, FASTSEL_BACKEND, the measured CUDA table
"""
from __future__ import annotations

from fastsel.ops.backend import EXTENSION
from fastsel.ops.class_stats import (
    ClassGrouping,
    class_grouping,
    class_stats_pool,
    class_stats_pool_ref,
    class_stats_update,
    class_stats_update_ref,
)
from fastsel.ops.embedding import accumulate_embedding_sq_grad, accumulate_embedding_sq_grad_ref
from fastsel.ops.layer_norm import accumulate_layer_norm_sq_grad, accumulate_layer_norm_sq_grad_ref
from fastsel.ops.linear import (
    BMM_WORKSPACE_BYTES,
    accumulate_linear_sq_grad,
    accumulate_linear_sq_grad_bmm,
    accumulate_linear_sq_grad_ref,
)
from fastsel.ops.norm import accumulate_norm_sq_grad, accumulate_norm_sq_grad_ref

__all__ = [
    "accumulate_linear_sq_grad",
    "accumulate_linear_sq_grad_ref",
    "accumulate_linear_sq_grad_bmm",
    "BMM_WORKSPACE_BYTES",
    "accumulate_norm_sq_grad",
    "accumulate_norm_sq_grad_ref",
    "accumulate_embedding_sq_grad",
    "accumulate_embedding_sq_grad_ref",
    "accumulate_layer_norm_sq_grad",
    "accumulate_layer_norm_sq_grad_ref",
    "class_grouping",
    "ClassGrouping",
    "class_stats_update",
    "class_stats_update_ref",
    "class_stats_pool",
    "class_stats_pool_ref",
    "EXTENSION",
    "OPS",
]

# Every op of the library, for `fastsel info` and the opcheck tests.
OPS: list[str] = ["accumulate_linear_sq_grad", "accumulate_norm_sq_grad", "accumulate_embedding_sq_grad",
                  "accumulate_layer_norm_sq_grad", "class_stats_update", "class_stats_pool"]
