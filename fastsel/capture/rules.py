"""Per-layer rules: how one module type turns its captured input and output gradient into per-example squared
gradients of its own parameters.

A rule gets one batched call of its module -- x (B, ...) the input, g = dL/d output (B, ...) -- and adds
sum_b (d l_b / d theta)**2 into fp32 accumulators ``{short param name: tensor shaped like the param}``.

Two kinds:

- :class:`FeatureRule`: the per-example gradient is a sum over positions t of the output gradient g_t times a
  feature phi_t of the input (Linear: g_t x_t^T, norms: g_t * x_hat_t, Embedding: g_t scattered to row idx_t).
  Several calls of one module (a weight used on the examples and on a batch-shared tensor, or twice) then
  combine by concatenating their positions before squaring.
- :class:`GenericRule`: any other module with its own parameters, by ``torch.func`` per-example gradients of
  that module alone (chunked).

Rules are looked up by module type along the MRO (:func:`register_rule` adds one, opacus-style); RMSNorm-style
modules are recognised by their math instead (:func:`recognise_rms_norm`), whatever their class.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
from torch import Tensor, nn

from fastsel import ops

__all__ = [
    "Rule", "FeatureRule", "GenericRule", "LinearRule", "LayerNormRule", "EmbeddingRule", "RMSNormRule",
    "RULES", "GENERIC", "RMS_NORM", "register_rule", "rule_for", "recognise_rms_norm",
]

Sums = dict[str, Tensor]  # {short param name: fp32 accumulator shaped like the param}


class Rule:
    """The per-example squared gradients of one module type's own parameters."""

    def accumulate(self, module: nn.Module, x: Tensor, g: Tensor, acc: Sums) -> None:
        """x (B, ...) the call's input, g (B, ...) dL/d output: adds sum_b grad_b**2 into ``acc``."""
        raise NotImplementedError


class FeatureRule(Rule):
    """A rule whose per-example gradient is sum_t g_t (x) phi_t; calls combine by concatenating positions."""

    def features(self, module: nn.Module, x: Tensor) -> Tensor:
        """x (B, ..., in) -> phi (N, F) float rows, or (N,) int indices; N = the leading dims of x flattened."""
        raise NotImplementedError

    def grad_width(self, module: nn.Module) -> int:
        """O, the width of one row of the output gradient."""
        raise NotImplementedError

    def accumulate_features(self, module: nn.Module, phi: Tensor, g: Tensor, acc: Sums) -> None:
        """phi (B, N, F) or (B, N) indices, g (B, N, O): adds sum_b (sum_t g_bt (x) phi_bt)**2 into ``acc``."""
        raise NotImplementedError

    def accumulate(self, module: nn.Module, x: Tensor, g: Tensor, acc: Sums) -> None:
        B = g.shape[0]
        phi = self.features(module, x)
        phi = phi.reshape(B, -1) if phi.dim() == 1 else phi.reshape(B, -1, phi.shape[-1])
        self.accumulate_features(module, phi, g.reshape(B, -1, self.grad_width(module)), acc)


class GenericRule(Rule):
    """Any module with its own parameters: per-example gradients of the module alone, by ``torch.func``."""

    def __init__(self, chunk: int = 16) -> None:
        self.chunk = chunk  # examples per vmap: bounds the (chunk, *param.shape) gradients held at once

    def accumulate(self, module: nn.Module, x: Tensor, g: Tensor, acc: Sums) -> None:
        for start in range(0, x.shape[0], self.chunk):
            grads = self.per_example_grads(module, x[start : start + self.chunk], g[start : start + self.chunk], list(acc))
            for n, gr in grads.items():
                acc[n].add_(gr.float().square().sum(0))

    @staticmethod
    def per_example_grads(module: nn.Module, x: Tensor, g: Tensor, names: Sequence[str], batched: bool = True) -> Sums:
        """x (B, ...), g (B, *output.shape[1:]) -> {name: (B, *param.shape)}, the gradients of sum(module(x_b) * g_b).

        ``batched=False``: x is one input shared by the batch (module(x) runs once), g (B, *output.shape)."""
        from torch.func import functional_call, grad, vmap

        params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if n in names}

        def dot(p: Sums, xb: Tensor, gb: Tensor) -> Tensor:
            out = functional_call(module, p, (xb.unsqueeze(0) if batched else xb,))
            return (out * (gb.unsqueeze(0) if batched else gb)).sum()

        return vmap(grad(dot), in_dims=(None, 0 if batched else None, 0))(params, x, g)


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------

RULES: dict[type[nn.Module], Rule] = {}
GENERIC = GenericRule()

R = TypeVar("R", bound=type[Rule])


def register_rule(module_type: type[nn.Module] | Sequence[type[nn.Module]]) -> Callable[[R], R]:
    """Class decorator: an instance of the decorated :class:`Rule` handles ``module_type`` (one type or several)
    and its subclasses without a rule of their own. A later registration for the same type replaces the earlier."""
    types = list(module_type) if isinstance(module_type, (list, tuple)) else [module_type]

    def decorator(cls: R) -> R:
        rule = cls()
        for t in types:
            RULES[t] = rule
        return cls

    return decorator


def rule_for(module: nn.Module) -> Rule:
    """The registered rule of the nearest class in the module's MRO, else the RMSNorm rule for a module that
    :func:`recognise_rms_norm` recognised, else :data:`GENERIC`."""
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls]
    if module in _RMS_SPECS:
        return RMS_NORM
    return GENERIC


# --------------------------------------------------------------------------------------------------
# Linear, LayerNorm, Embedding
# --------------------------------------------------------------------------------------------------


@register_rule(nn.Linear)
class LinearRule(FeatureRule):
    """weight: sum_b (sum_t g_bt x_bt^T)**2, one fused GEMM of squares; bias: sum_b (sum_t g_bt)**2."""

    def features(self, module: nn.Module, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    def grad_width(self, module: nn.Module) -> int:
        return module.out_features

    def accumulate_features(self, module: nn.Module, phi: Tensor, g: Tensor, acc: Sums) -> None:
        if "weight" in acc:
            ops.accumulate_linear_sq_grad(acc["weight"], g, phi)
        if "bias" in acc:
            ops.accumulate_norm_sq_grad(acc["bias"], g, None)

    def accumulate_shared_input(self, x: Tensor, grads: Sequence[Tensor], accs: Sequence[Sums]) -> None:
        """x (B, ..., I), the one input of several Linears (Q, K and V); grads[k] (B, ..., O_k), the output gradient
        of the k-th, accs[k] its sums. Their weights in one linear-op call and their biases in one norm-op call:
        stacked along the output, cat(g_k) (B, T, sum O_k), each layer's per-example gradient is its own block of
        rows of cat(g_k)^T x, so the blocks of the stacked sums are each layer's sums (x read and cast once)."""
        B = x.shape[0]
        phi = x.reshape(B, -1, x.shape[-1])
        g = [gk.reshape(B, -1, gk.shape[-1]) for gk in grads]
        widths = [gk.shape[-1] for gk in g]
        stacked = torch.cat(g, -1)  # one copy of the gradients, read by both calls
        for name in ("weight", "bias"):
            idx = [k for k, acc in enumerate(accs) if name in acc]
            if not idx:
                continue
            # members without this sum (a bias-free Linear) are computed and dropped: cheaper than a second copy
            out = torch.zeros((sum(widths), *accs[idx[0]][name].shape[1:]), dtype=torch.float32, device=stacked.device)
            if name == "weight":
                ops.accumulate_linear_sq_grad(out, stacked, phi)
            else:
                ops.accumulate_norm_sq_grad(out, stacked, None)
            for k, part in enumerate(out.split(widths)):
                if name in accs[k]:
                    accs[k][name].add_(part)


class NormRule(FeatureRule):
    """Elementwise scale and shift of a normalised input x_hat: weight sum_b (sum_t g_bt x_hat_bt)**2."""

    def grad_width(self, module: nn.Module) -> int:
        return (module.weight if module.weight is not None else module.bias).numel()

    def accumulate_features(self, module: nn.Module, phi: Tensor, g: Tensor, acc: Sums) -> None:
        if "weight" in acc:
            ops.accumulate_norm_sq_grad(acc["weight"].view(-1), g, phi)
        if "bias" in acc:
            ops.accumulate_norm_sq_grad(acc["bias"].view(-1), g, None)


@register_rule(nn.LayerNorm)
class LayerNormRule(NormRule):
    """weight and bias of a LayerNorm over the last dim in one call of the LayerNorm op (x_hat made inside, never
    stored); over several trailing dims, x_hat as features and the scale/bias op."""

    def accumulate(self, module: nn.Module, x: Tensor, g: Tensor, acc: Sums) -> None:
        if len(module.normalized_shape) != 1 or not ("weight" in acc or "bias" in acc):
            return super().accumulate(module, x, g, acc)
        B, D = g.shape[0], module.normalized_shape[0]
        w, b = acc.get("weight"), acc.get("bias")
        ops.accumulate_layer_norm_sq_grad(None if w is None else w.view(-1), None if b is None else b.view(-1),
                                          g.reshape(B, -1, D), x.reshape(B, -1, D), module.eps)

    def features(self, module: nn.Module, x: Tensor) -> Tensor:
        # One fused pass (mean and rstd together), not mean + var + sub + mul.
        x_hat = torch.nn.functional.layer_norm(x.float(), module.normalized_shape, None, None, module.eps)
        return x_hat.reshape(-1, self.grad_width(module))


@register_rule(nn.Embedding)
class EmbeddingRule(FeatureRule):
    """weight: sum_b (row-wise sum of g_bt over the positions t with index idx_bt)**2; tokens repeated within
    one example add up before the square; the padding row gets nothing."""

    def features(self, module: nn.Module, x: Tensor) -> Tensor:
        return x.reshape(-1)

    def grad_width(self, module: nn.Module) -> int:
        return module.embedding_dim

    def accumulate_features(self, module: nn.Module, phi: Tensor, g: Tensor, acc: Sums) -> None:
        pad = module.padding_idx if module.padding_idx is not None else -1
        ops.accumulate_embedding_sq_grad(acc["weight"], g, phi, pad)


# --------------------------------------------------------------------------------------------------
# RMSNorm-style modules (nn.RMSNorm, LlamaRMSNorm, Qwen2RMSNorm, T5LayerNorm, (1 + weight) variants, ...):
# recognised by their math on a random input, not by class name, since every model family has its own class.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RMSSpec:
    eps: float
    ndim: int  # normalised trailing dims
    cast: bool  # x_hat is cast to the input dtype before the scale (Llama's fp32 upcast)
    eps_from_dtype: bool = False  # nn.RMSNorm(eps=None): eps = finfo(input dtype).eps


_RMS_SPECS: "weakref.WeakKeyDictionary[nn.Module, RMSSpec]" = weakref.WeakKeyDictionary()


class RMSNormRule(NormRule):
    """(w [+ 1]) * x * rsqrt(mean(x^2) + eps) over the weight's dims; the spec comes from recognise_rms_norm."""

    def features(self, module: nn.Module, x: Tensor) -> Tensor:
        spec = _RMS_SPECS[module]
        dims = tuple(range(-spec.ndim, 0))
        xf = x.float()
        eps = torch.finfo(x.dtype).eps if spec.eps_from_dtype and x.is_floating_point() else spec.eps
        x_hat = xf * torch.rsqrt(xf.square().mean(dims, keepdim=True) + eps)
        if spec.cast and x.dtype != torch.float32:  # LlamaRMSNorm: weight * x_hat.to(input dtype)
            x_hat = x_hat.to(x.dtype).float()
        return x_hat.reshape(-1, self.grad_width(module))


RMS_NORM = RMSNormRule()


def recognise_rms_norm(module: nn.Module) -> RMSSpec | None:
    """Whether ``module(x) == (w [+ 1]) * x * rsqrt(mean(x^2) + eps)`` over the weight's dims, checked on random
    inputs of two magnitudes (so that eps is pinned down) with a random weight. If so, the module is recorded
    (:func:`rule_for` then gives :data:`RMS_NORM`) and its spec returned."""
    if module in _RMS_SPECS:
        return _RMS_SPECS[module]
    spec = _detect_rms_norm(module)
    if spec is not None:
        _RMS_SPECS[module] = spec
    return spec


def _detect_rms_norm(module: nn.Module) -> RMSSpec | None:
    own = dict(module.named_parameters(recurse=False))
    if list(own) != ["weight"] or any(True for _ in module.children()):
        return None
    w = own["weight"]
    if w.device.type == "meta" or not w.is_floating_point() or w.dim() == 0:
        return None
    cands = []
    for attr in ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "norm_eps"):
        v = getattr(module, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            cands.append(float(v))
    cands += [torch.finfo(torch.float32).eps, 1e-6, 1e-5, 1e-12, 1e-8]
    gen = torch.Generator(device="cpu").manual_seed(1234)
    try:
        from torch.func import functional_call

        wr = (torch.randn(w.shape, generator=gen) + 0.5).to(w.device)
        x = torch.randn((3, 5, *w.shape), generator=gen).to(w.device)
        xs = torch.cat([x, x * 1e-3])
        with torch.no_grad():
            y = functional_call(module, {"weight": wr}, (xs,))
        if not isinstance(y, Tensor) or y.shape != xs.shape or y.dtype != torch.float32:
            return None
        dims = tuple(range(-w.dim(), 0))
        for eps in cands:
            xh = xs * torch.rsqrt(xs.square().mean(dims, keepdim=True) + eps)
            for off in (0.0, 1.0):
                if torch.allclose(y, (wr + off) * xh, rtol=1e-4, atol=1e-6):
                    unset = "eps" in vars(module) and module.eps is None and eps == torch.finfo(torch.float32).eps
                    return RMSSpec(eps, w.dim(), cast=True, eps_from_dtype=unset)
    except Exception:  # noqa: BLE001 - any module that cannot run on a plain tensor is not an RMSNorm
        return None
    return None
