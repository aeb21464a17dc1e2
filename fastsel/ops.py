"""Typed wrappers of the fastsel ops, their fake (meta) kernels, and their pure-torch ``*_ref`` twins.

Each wrapper runs the compiled kernel for the tensor's device when the extension has one, and the
``*_ref`` twin otherwise (see ``fastsel info``). The ``*_ref`` twins are also the test oracles.

Shape conventions: B examples, T positions per example (any number of middle dims is flattened into
T; a 2-d input is T = 1), O/I/D feature sizes, V embedding rows. Accumulators are float32; inputs may be
fp32, bf16 or fp16 and are accumulated in fp32.

The linear op has several backends (``fastsel._backend``): the compiled kernel (with two CUDA variants),
per-example batched GEMMs (:func:`accumulate_linear_sq_grad_bmm`) and the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastsel._backend import EXTENSION, choose_linear_backend, op_backend

__all__ = [
    "accumulate_linear_sq_grad",
    "accumulate_linear_sq_grad_ref",
    "accumulate_linear_sq_grad_bmm",
    "BMM_WORKSPACE_BYTES",
    "accumulate_norm_sq_grad",
    "accumulate_norm_sq_grad_ref",
    "accumulate_embedding_sq_grad",
    "accumulate_embedding_sq_grad_ref",
    "class_stats_update",
    "class_stats_update_ref",
    "OPS",
]

# Every op of the library, for `fastsel info` and the opcheck tests.
OPS: list[str] = ["accumulate_linear_sq_grad", "accumulate_norm_sq_grad", "accumulate_embedding_sq_grad", "class_stats_update"]

_REF_CHUNK_ELEMENTS = 1 << 24  # per-example gradients materialised at once by the references
BMM_WORKSPACE_BYTES = 256 << 20  # fp32 per-example products the bmm backend holds at once
# Kernel variant numbers of the schema (csrc/sq_grad.cpp): the compiled backends of the linear op.
_LINEAR_VARIANTS = {"kernel": 0, "wmma": 1, "pipelined": 2}


def _use_kernel(op_name: str, device: torch.device) -> bool:
    return op_backend(op_name, device)[0] != "reference"


def _btf(t: Tensor) -> Tensor:
    if t.dim() < 2:
        raise ValueError(f"fastsel: expected a tensor of shape (B, ..., F), got {tuple(t.shape)}")
    return t.reshape(t.shape[0], t.shape[1:-1].numel(), t.shape[-1]).float()


def _check_out(out: Tensor, shape: tuple[int, ...], ref: Tensor) -> None:
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"fastsel: out (the accumulator) must be contiguous float32, got {out.dtype}")
    if tuple(out.shape) != shape:
        raise ValueError(f"fastsel: out must have shape {shape}, got {tuple(out.shape)}")
    if out.device != ref.device:
        raise ValueError(f"fastsel: out is on {out.device} but grad_output is on {ref.device}")


# ---------------------------------------------------------------------------------------------------
# Linear: out (O, I) += sum_b (grad_output[b]^T @ input[b])^2
# ---------------------------------------------------------------------------------------------------


def accumulate_linear_sq_grad(out: Tensor, grad_output: Tensor, input: Tensor, *, backend: str | None = None) -> None:
    """Add the per-example squared weight gradients of a linear layer y = x W^T + b into ``out``.

    out (O, I) float32, updated in place; grad_output (B, *, O) = dL_b/dy; input (B, *, I) = x.
    The per-example gradient of W for example b is grad_output[b]^T @ input[b] (summed over positions).
    ``backend``: 'kernel', 'wmma', 'pipelined' (CUDA), 'bmm' or 'reference'; None picks as
    ``fastsel._backend`` says (FASTSEL_BACKEND, the measured table, the compiled kernel).
    """
    B, O, I = grad_output.shape[0], grad_output.shape[-1], input.shape[-1]
    T = grad_output[0].numel() // max(O, 1) if grad_output.dim() > 2 and B else 1
    name = choose_linear_backend(out.device, grad_output.dtype, B, T, O, I, backend)
    if name in _LINEAR_VARIANTS:
        torch.ops.fastsel.accumulate_linear_sq_grad(out, grad_output, input, _LINEAR_VARIANTS[name])
    elif name == "bmm":
        accumulate_linear_sq_grad_bmm(out, grad_output, input)
    else:
        accumulate_linear_sq_grad_ref(out, grad_output, input)


# torch.bmm(..., out_dtype=float32) for half operands (CUDA, torch >= 2.8); else the operands go to fp32.
_HALF_BMM_FP32_OUT = "out_dtype" in (torch.bmm.__doc__ or "") or hasattr(torch.ops.aten.bmm, "dtype")


def _operand_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype both GEMM operands are cast to: a shared fp32/bf16/fp16, the half one of half + fp32, else fp32."""
    native = (torch.float32, torch.bfloat16, torch.float16)
    if a == b and a in native:
        return a
    for h, other in ((a, b), (b, a)):
        if h in (torch.bfloat16, torch.float16) and other == torch.float32:
            return h
    return torch.float32


def accumulate_linear_sq_grad_bmm(out: Tensor, grad_output: Tensor, input: Tensor,
                                  workspace_bytes: int = BMM_WORKSPACE_BYTES) -> None:
    """Batched-GEMM backend of :func:`accumulate_linear_sq_grad`: no custom kernel.

    For chunks of examples, P_b = grad_output[b]^T @ input[b] (chunk, O, I) by one ``torch.bmm`` into an fp32
    workspace of at most ``workspace_bytes`` (half operands stay half with an fp32 output on CUDA, so cuBLAS
    uses the tensor cores), then out += sum_b P_b^2. T == 1 is one GEMM of squares, (g^2)^T (x^2).
    Operand dtypes as the CUDA kernels: half + fp32 is computed in the half type.
    """
    if grad_output.dim() != input.dim() or grad_output.shape[:-1] != input.shape[:-1] or grad_output.dim() < 2:
        raise ValueError(
            f"fastsel: linear_sq_grad wants grad_output (B, ..., O) and input (B, ..., I) with equal leading "
            f"dims, got {tuple(grad_output.shape)} and {tuple(input.shape)}"
        )
    dtype = _operand_dtype(grad_output.dtype, input.dtype)
    positions = grad_output.shape[1:-1].numel()  # explicit: reshape cannot infer -1 when B == 0
    g = grad_output.reshape(grad_output.shape[0], positions, grad_output.shape[-1]).to(dtype)  # (B, T, O)
    x = input.reshape(input.shape[0], positions, input.shape[-1]).to(dtype)  # (B, T, I)
    B, T, O = g.shape
    I = x.shape[-1]
    _check_out(out, (O, I), grad_output)
    if B == 0 or T == 0 or O == 0 or I == 0:
        return
    if T == 1:  # sum_b (g_b x_b^T)^2 = (g^2)^T x^2: one GEMM
        out.addmm_(g[:, 0].float().square().t(), x[:, 0].float().square())
        return
    half_out = dtype != torch.float32 and out.is_cuda and _HALF_BMM_FP32_OUT  # cuBLAS: half in, fp32 out
    if not half_out and dtype != torch.float32:
        g, x = g.float(), x.float()  # CPU BLAS has no half GEMM with an fp32 output
    chunk = max(1, min(B, workspace_bytes // max(1, 4 * O * I)))
    work = None if half_out else torch.empty(chunk, O, I, dtype=torch.float32, device=out.device)
    for start in range(0, B, chunk):
        n = min(chunk, B - start)
        gt, xc = g[start : start + n].transpose(1, 2), x[start : start + n]
        prod = torch.bmm(gt, xc, out_dtype=torch.float32) if half_out else torch.bmm(gt, xc, out=work[:n])
        out.add_(prod.square_().sum(0))


def accumulate_linear_sq_grad_ref(out: Tensor, grad_output: Tensor, input: Tensor) -> None:
    """Pure-torch twin of :func:`accumulate_linear_sq_grad`: materialises per-example gradients in chunks."""
    if grad_output.dim() != input.dim() or grad_output.shape[:-1] != input.shape[:-1]:
        raise ValueError(
            f"fastsel: linear_sq_grad wants grad_output (B, ..., O) and input (B, ..., I) with equal leading "
            f"dims, got {tuple(grad_output.shape)} and {tuple(input.shape)}"
        )
    g, x = _btf(grad_output), _btf(input)
    _check_out(out, (g.shape[-1], x.shape[-1]), grad_output)
    chunk = max(1, _REF_CHUNK_ELEMENTS // max(1, g.shape[-1] * x.shape[-1]))
    for start in range(0, g.shape[0], chunk):
        per_example = torch.bmm(g[start : start + chunk].transpose(1, 2), x[start : start + chunk])
        out.add_(per_example.square().sum(0))


# ---------------------------------------------------------------------------------------------------
# Scale / bias vectors (LayerNorm weight and bias, Linear bias): out (D,) += sum_b (sum_t g * x)^2
# ---------------------------------------------------------------------------------------------------


def accumulate_norm_sq_grad(out: Tensor, grad_output: Tensor, input: Tensor | None = None) -> None:
    """Add per-example squared gradients of an elementwise scale (or, with ``input=None``, a bias).

    out (D,) float32, updated in place; grad_output (B, *, D); input (B, *, D) or None.
    The per-example gradient of a scale gamma in y = gamma * input (+ beta) is sum_t grad_output * input;
    of a bias beta it is sum_t grad_output.
    """
    if _use_kernel("accumulate_norm_sq_grad", out.device):
        torch.ops.fastsel.accumulate_norm_sq_grad(out, grad_output, input)
    else:
        accumulate_norm_sq_grad_ref(out, grad_output, input)


def accumulate_norm_sq_grad_ref(out: Tensor, grad_output: Tensor, input: Tensor | None = None) -> None:
    """Pure-torch twin of :func:`accumulate_norm_sq_grad`."""
    g = _btf(grad_output)
    if input is not None:
        if input.shape != grad_output.shape:
            raise ValueError(
                f"fastsel: input {tuple(input.shape)} and grad_output {tuple(grad_output.shape)} must have the same shape"
            )
        g = g * _btf(input)
    _check_out(out, (g.shape[-1],), grad_output)
    out.add_(g.sum(1).square().sum(0))


# ---------------------------------------------------------------------------------------------------
# Embedding: out (V, D) += sum_b (sum_{t: idx[b,t] = v} grad_output[b, t])^2
# ---------------------------------------------------------------------------------------------------


def accumulate_embedding_sq_grad(out: Tensor, grad_output: Tensor, indices: Tensor, padding_idx: int = -1) -> None:
    """Add per-example squared gradients of an embedding table into ``out``.

    out (V, D) float32, updated in place; grad_output (B, *, D); indices (B, *) integer.
    A token repeated within one example contributes the square of the sum of its rows. Rows equal to
    ``padding_idx`` (-1: none) are skipped, as nn.Embedding never updates them.
    """
    if _use_kernel("accumulate_embedding_sq_grad", out.device):
        torch.ops.fastsel.accumulate_embedding_sq_grad(out, grad_output, indices, padding_idx)
    else:
        accumulate_embedding_sq_grad_ref(out, grad_output, indices, padding_idx)


def accumulate_embedding_sq_grad_ref(out: Tensor, grad_output: Tensor, indices: Tensor, padding_idx: int = -1) -> None:
    """Pure-torch twin of :func:`accumulate_embedding_sq_grad`: sums rows per (example, token) pair."""
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fastsel: indices must be int64 or int32, got {indices.dtype}")
    if grad_output.dim() != indices.dim() + 1 or grad_output.shape[:-1] != indices.shape:
        raise ValueError(
            f"fastsel: embedding_sq_grad wants indices (B, ...) and grad_output (B, ..., D), got "
            f"{tuple(indices.shape)} and {tuple(grad_output.shape)}"
        )
    g = _btf(grad_output)
    B, T, D = g.shape
    if out.dim() != 2:
        raise ValueError(f"fastsel: out must be (V, D), got {tuple(out.shape)}")
    V = out.shape[0]
    _check_out(out, (V, D), grad_output)
    idx = indices.reshape(B, T).long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= V):
        raise ValueError(f"fastsel: embedding index out of range [0, {V})")
    example = torch.arange(B, device=idx.device).unsqueeze(1).expand(B, T)
    keys, inverse = torch.unique(example * V + idx, return_inverse=True)
    sums = torch.zeros(keys.numel(), D, dtype=torch.float32, device=g.device)
    sums.index_add_(0, inverse.reshape(-1), g.reshape(B * T, D))
    tokens = keys % V
    keep = tokens != padding_idx
    out.index_add_(0, tokens[keep], sums[keep].square())


# ---------------------------------------------------------------------------------------------------
# Fake kernels: let the ops run under torch.compile / FakeTensor (they mutate `out` and return nothing).
# ---------------------------------------------------------------------------------------------------

if EXTENSION.loaded:

    @torch.library.register_fake("fastsel::accumulate_linear_sq_grad")
    def _(out: Tensor, grad_output: Tensor, input: Tensor, variant: int = 0) -> None:
        torch._check(out.dim() == 2, lambda: "out must be (O, I)")

    @torch.library.register_fake("fastsel::accumulate_norm_sq_grad")
    def _(out: Tensor, grad_output: Tensor, input: Tensor | None) -> None:
        torch._check(out.dim() == 1, lambda: "out must be (D,)")

    @torch.library.register_fake("fastsel::accumulate_embedding_sq_grad")
    def _(out: Tensor, grad_output: Tensor, indices: Tensor, padding_idx: int) -> None:
        torch._check(out.dim() == 2, lambda: "out must be (V, D)")


# ---------------------------------------------------------------------------------------------------
# Streaming per-class statistics of pooled hidden states (the variability ratio, fastsel.variability)
# ---------------------------------------------------------------------------------------------------


def class_stats_update(count: Tensor, mean: Tensor, m2: Tensor, hidden: Tensor, pool_mask: Tensor, labels: Tensor) -> None:
    """Pool ``hidden`` per example and merge each class's batch statistics into the running ones, in place.

    count (C,) float64; mean (C, D) and m2 (C, D, D) float64 or float32 (same dtype); hidden (B, T, D)
    any float dtype; pool_mask (B, T) (nonzero = pooled token); labels (B,) int64 in [0, C).
    Example b's state is the mean of hidden[b, t] over its pooled tokens; examples with no pooled token
    are skipped. For each class the batch's (count n_b, mean, centred scatter S_b) is merged with
    Chan's formula: n = n_a + n_b, mean += delta n_b / n, m2 += S_b + delta delta^T n_a n_b / n.
    """
    if _use_kernel("class_stats_update", hidden.device):
        torch.ops.fastsel.class_stats_update(count, mean, m2, hidden, pool_mask, labels)
    else:
        class_stats_update_ref(count, mean, m2, hidden, pool_mask, labels)


def _check_class_stats(count: Tensor, mean: Tensor, m2: Tensor, hidden: Tensor, pool_mask: Tensor, labels: Tensor) -> None:
    if not hidden.is_floating_point() or hidden.dim() != 3:
        raise ValueError(f"fastsel: hidden must be a floating (B, T, D) tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    B, T, D = hidden.shape
    if tuple(pool_mask.shape) != (B, T):
        raise ValueError(f"fastsel: pool_mask must be (B, T) = {(B, T)}, got {tuple(pool_mask.shape)}")
    if labels.dtype != torch.int64 or tuple(labels.shape) != (B,):
        raise ValueError(f"fastsel: labels must be int64 (B,) = ({B},), got {labels.dtype} {tuple(labels.shape)}")
    if count.dtype != torch.float64 or count.dim() != 1 or count.shape[0] < 1:
        raise ValueError(f"fastsel: count must be float64 (C,), got {count.dtype} {tuple(count.shape)}")
    C = count.shape[0]
    if mean.dtype not in (torch.float32, torch.float64) or m2.dtype != mean.dtype:
        raise ValueError(f"fastsel: mean and m2 must both be float32 or float64, got {mean.dtype} and {m2.dtype}")
    if tuple(mean.shape) != (C, D) or tuple(m2.shape) != (C, D, D):
        raise ValueError(f"fastsel: mean must be (C, D) = {(C, D)} and m2 (C, D, D), got {tuple(mean.shape)}, {tuple(m2.shape)}")
    if not (count.is_contiguous() and mean.is_contiguous() and m2.is_contiguous()):
        raise ValueError("fastsel: the accumulators (count, mean, m2) must be contiguous")
    for t in (count, mean, m2, pool_mask, labels):
        if t.device != hidden.device:
            raise ValueError(f"fastsel: all tensors must be on {hidden.device}, got one on {t.device}")
    if B and (labels.min() < 0 or labels.max() >= C):
        raise ValueError(f"fastsel: labels out of range [0, {C})")


def class_stats_update_ref(count: Tensor, mean: Tensor, m2: Tensor, hidden: Tensor, pool_mask: Tensor, labels: Tensor) -> None:
    """Pure-torch twin of :func:`class_stats_update` (vectorised over the batch, one-hot over classes)."""
    _check_class_stats(count, mean, m2, hidden, pool_mask, labels)
    B, _, D = hidden.shape
    if B == 0:
        return
    acc = mean.dtype
    w = (pool_mask != 0).to(acc)  # (B, T)
    ntok = w.sum(1)  # (B,)
    pooled = torch.bmm(w.unsqueeze(1), hidden.to(acc)).squeeze(1) / ntok.clamp(min=1).unsqueeze(1)  # (B, D)
    onehot = torch.nn.functional.one_hot(labels, count.shape[0]).to(acc) * (ntok > 0).to(acc).unsqueeze(1)  # (B, C)
    nb = onehot.sum(0)  # (C,)
    present = nb > 0
    bmean = (onehot.t() @ pooled) / nb.clamp(min=1).unsqueeze(1)  # (C, D)
    centred = pooled.unsqueeze(0) - bmean.unsqueeze(1)  # (C, B, D)
    weighted = centred * onehot.t().unsqueeze(2)
    scatter = weighted.transpose(1, 2) @ centred  # (C, D, D): S_b = sum_{b in c} x_c x_c^T
    na = count.to(acc)
    n = na + nb
    delta = bmean - mean  # (C, D)
    coef = torch.where(present, na * nb / n.clamp(min=1), torch.zeros_like(n))
    m2.add_(scatter + coef.view(-1, 1, 1) * delta.unsqueeze(2) * delta.unsqueeze(1))
    mean.add_(delta * torch.where(present, nb / n.clamp(min=1), torch.zeros_like(n)).unsqueeze(1))
    count.add_(nb.to(torch.float64))


if EXTENSION.loaded:

    @torch.library.register_fake("fastsel::class_stats_update")
    def _(count: Tensor, mean: Tensor, m2: Tensor, hidden: Tensor, pool_mask: Tensor, labels: Tensor) -> None:
        torch._check(hidden.dim() == 3, lambda: "hidden must be (B, T, D)")
        torch._check(m2.dim() == 3, lambda: "m2 must be (C, D, D)")
