"""Per-example squared gradients of any torch module, from ONE batched backward.

``SquaredGradAccumulator`` hooks every module that owns trainable parameters. The forward hooks keep
each layer's input; a hook on each layer's output receives dL/d(output) during the backward and hands
(input, output-gradient) to the rule for that layer type, which adds sum_b g_b**2 into fp32
accumulators through the fused ops of :mod:`fastsel.ops`. Per-example gradients of the whole model are
never materialised, and the backward computes no parameter gradients at all (only activation
gradients), so a pass costs about one training step.

Rules: ``nn.Linear``, ``nn.LayerNorm``, ``nn.Embedding`` (tokens repeated within one example handled),
and a generic rule for any other module with its own parameters (``torch.func`` per-example gradients
of that module alone, chunked). Parameters the hooks cannot see per example -- used outside a module
call (DeBERTa's relative-position table) or in a computation shared by the whole batch -- are computed
exactly by per-example backward passes restricted to them and listed in ``fallback_params``.

Embedding indices with a batch dimension of 1 (HF's position ids of shape (1, T)) are expanded to the
batch before the lookup: otherwise their gradients arrive summed over the batch.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fastsel import ops

__all__ = ["SquaredGradAccumulator", "RULES", "Rule"]


# --------------------------------------------------------------------------------------------------
# Rules. A native rule writes the per-example gradient of each own parameter as a sum over positions t of
# a product of the output gradient g_t with a feature phi_t of the input (Linear: g_t x_t^T, norms:
# g_t * x_hat_t, Embedding: g_t scattered to row idx_t). Several calls of one module (a weight used on the
# examples and on a batch-shared tensor, or twice) therefore combine by concatenating their positions.
# --------------------------------------------------------------------------------------------------

AccumulateFn = Callable[[nn.Module, Tensor, Tensor, dict[str, Tensor]], None]


@dataclass(frozen=True)
class Rule:
    """How to accumulate the per-example squared gradients of one module type's own parameters.

    ``accumulate(module, x, g, acc)``: one batched call (x (B, ...), g = dL/d output (B, ...)).
    Native rules also give ``features(module, x) -> phi`` (phi (N, F) rows, or (N,) indices, over the
    leading dims of x flattened), ``grad_width(module)`` (g's row width) and ``accumulate_rows(module,
    phi (B, N, F), g (B, N, O), acc)``, from which several calls combine; ``features=None``: generic rule.
    """

    accumulate: AccumulateFn
    features: Callable[[nn.Module, Tensor], Tensor] | None = None
    grad_width: Callable[[nn.Module], int] | None = None
    accumulate_rows: Callable[[nn.Module, Tensor, Tensor, dict[str, Tensor]], None] | None = None


def _native(features, grad_width, accumulate_rows) -> Rule:
    def accumulate(module: nn.Module, x: Tensor, g: Tensor, acc: dict[str, Tensor]) -> None:
        B = g.shape[0]
        phi = features(module, x)
        phi = phi.reshape(B, -1) if phi.dim() == 1 else phi.reshape(B, -1, phi.shape[-1])
        accumulate_rows(module, phi, g.reshape(B, -1, grad_width(module)), acc)

    return Rule(accumulate, features, grad_width, accumulate_rows)


def _linear_rows(module: nn.Linear, x: Tensor, g: Tensor, acc: dict[str, Tensor]) -> None:
    if "weight" in acc:
        ops.accumulate_linear_sq_grad(acc["weight"], g, x)
    if "bias" in acc:
        ops.accumulate_norm_sq_grad(acc["bias"], g, None)


def _linear_features(module: nn.Linear, x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _norm_rows(module: nn.Module, x_hat: Tensor, g: Tensor, acc: dict[str, Tensor]) -> None:
    if "weight" in acc:
        ops.accumulate_norm_sq_grad(acc["weight"].view(-1), g, x_hat)
    if "bias" in acc:
        ops.accumulate_norm_sq_grad(acc["bias"].view(-1), g, None)


def _norm_width(module: nn.Module) -> int:
    return (module.weight if module.weight is not None else module.bias).numel()


def _layer_norm_features(module: nn.LayerNorm, x: Tensor) -> Tensor:
    # One fused pass (mean and rstd together), not mean + var + sub + mul.
    x_hat = torch.nn.functional.layer_norm(x.float(), module.normalized_shape, None, None, module.eps)
    return x_hat.reshape(-1, _norm_width(module))


def _rms_norm_features(module: nn.Module, x: Tensor) -> Tensor:
    spec = _RMS_SPECS[module]
    dims = tuple(range(-spec.ndim, 0))
    xf = x.float()
    eps = torch.finfo(x.dtype).eps if spec.eps_from_dtype and x.is_floating_point() else spec.eps
    x_hat = xf * torch.rsqrt(xf.square().mean(dims, keepdim=True) + eps)
    if spec.cast and x.dtype != torch.float32:  # LlamaRMSNorm: weight * x_hat.to(input dtype)
        x_hat = x_hat.to(x.dtype).float()
    return x_hat.reshape(-1, _norm_width(module))


def _embedding_rows(module: nn.Embedding, idx: Tensor, g: Tensor, acc: dict[str, Tensor]) -> None:
    pad = module.padding_idx if module.padding_idx is not None else -1
    ops.accumulate_embedding_sq_grad(acc["weight"], g, idx, pad)


def _generic(module: nn.Module, x: Tensor, g: Tensor, acc: dict[str, Tensor], chunk: int = 16) -> None:
    """Any module with its own parameters: per-example gradients of this module alone, by torch.func."""
    for start in range(0, x.shape[0], chunk):
        grads = _generic_per_example(module, x[start : start + chunk], g[start : start + chunk], list(acc), batched=True)
        for n, gr in grads.items():
            acc[n].add_(gr.float().square().sum(0))


def _generic_per_example(module: nn.Module, x: Tensor, g: Tensor, names: list[str], batched: bool) -> dict[str, Tensor]:
    """{name: (B, *param.shape)} per-example gradients of ``sum(module(x_b) * g_b)``; ``batched=False``:
    x is one input shared by the batch (module(x) once), g (B, *output.shape)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if n in names}

    def dot(p: dict[str, Tensor], xb: Tensor, gb: Tensor) -> Tensor:
        out = functional_call(module, p, (xb.unsqueeze(0) if batched else xb,))
        return (out * (gb.unsqueeze(0) if batched else gb)).sum()

    return vmap(grad(dot), in_dims=(None, 0 if batched else None, 0))(params, x, g)


RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: _native(_linear_features, lambda m: m.out_features, _linear_rows),
    nn.LayerNorm: _native(_layer_norm_features, _norm_width, _norm_rows),
    nn.Embedding: _native(lambda m, idx: idx.reshape(-1), lambda m: m.embedding_dim, _embedding_rows),
}
_GENERIC = Rule(_generic)
# RMSNorm-style modules (nn.RMSNorm, LlamaRMSNorm, Qwen2RMSNorm, T5LayerNorm, (1 + weight) variants, ...):
# recognised by their math on a random input (see _detect_rms_norm), not by class name.
_RMS_NORM = _native(_rms_norm_features, _norm_width, _norm_rows)


@dataclass(frozen=True)
class _RMSSpec:
    eps: float
    ndim: int  # normalised trailing dims
    cast: bool  # x_hat is cast to the input dtype before the scale (Llama's fp32 upcast)
    eps_from_dtype: bool = False  # nn.RMSNorm(eps=None): eps = finfo(input dtype).eps


_RMS_SPECS: "weakref.WeakKeyDictionary[nn.Module, _RMSSpec]" = weakref.WeakKeyDictionary()


def _detect_rms_norm(module: nn.Module) -> _RMSSpec | None:
    """Whether ``module(x) == (w [+ 1]) * x * rsqrt(mean(x^2) + eps)`` over the weight's dims, checked on
    random inputs of two magnitudes (so that eps is pinned down) with a random weight; the eps found."""
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
                    return _RMSSpec(eps, w.dim(), cast=True, eps_from_dtype=unset)
    except Exception:  # noqa: BLE001 - any module that cannot run on a plain tensor is not an RMSNorm
        return None
    return None


def _rule_for(module: nn.Module) -> Rule:
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls]
    if module in _RMS_SPECS:
        return _RMS_NORM
    return _GENERIC


# --------------------------------------------------------------------------------------------------
# Batch-shared computations: where they meet the examples
# --------------------------------------------------------------------------------------------------

_BROADCASTS = {Tensor.repeat, Tensor.expand, Tensor.expand_as, torch.broadcast_to, Tensor.broadcast_to}
_ELEMENTWISE = {
    torch.add, torch.sub, torch.mul, torch.div, torch.subtract, torch.multiply, torch.true_divide,
    Tensor.add, Tensor.sub, Tensor.mul, Tensor.div, Tensor.__add__, Tensor.__radd__, Tensor.__sub__,
    Tensor.__rsub__, Tensor.__mul__, Tensor.__rmul__, Tensor.__truediv__, Tensor.__rtruediv__,
}


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, Tensor))
    return out


@dataclass
class _Frame:
    module_name: str
    own: frozenset[int]  # ids of the module's own tracked parameters
    batched: bool  # called on the examples (first input (B, ...), not a batch-shared tensor)


@dataclass
class _Capture:
    shared: Tensor  # S: computed from parameters only, the same for every example
    expanded: Tensor  # T = S broadcast to the batch: (B * S.shape[0], ...) or (B, *S.shape), example-major


class _SharedTracker(TorchFunctionMode):
    """Follows, during the forward, the tensors computed from parameters alone (the same for every example).

    Where such a tensor S meets the examples -- broadcast to the batch (``repeat``/``expand`` with the batch
    size as leading factor, or implicit broadcasting against a (B, ...) tensor in an elementwise op) -- the
    broadcast is made explicit as T = S.reshape(1|k, ...).repeat/expand(B, ...): the gradient of T is then
    the per-example cotangent of S, (B, *S.shape), with no loss of exactness. Any other meeting (S used with
    example data in a matmul, say) taints S's parameters: they go to the exact fallback. Ops that use a
    module's own parameters inside a call of that module on the examples are the rules' business.
    """

    def __init__(self, params: dict[str, Tensor], batch_size: int) -> None:
        super().__init__()
        self.B = batch_size
        self.param_name = {id(p): n for n, p in params.items()}
        # id -> (tensor, names of the parameters it depends on); strong refs for the batch's lifetime
        self.shared: dict[int, tuple[Tensor, frozenset[str]]] = {id(p): (p, frozenset((n,))) for n, p in params.items()}
        self.frames: list[_Frame] = []
        self.direct: set[str] = set()  # parameters used outside a call of their own module
        self.tainted: set[str] = set()  # parameters of shared tensors that met the examples uncaptured
        self.captures: list[_Capture] = []
        self.active = True  # off once the backward starts (the rules' own ops need no tracking)

    def is_shared(self, t: object) -> bool:
        e = self.shared.get(id(t)) if isinstance(t, Tensor) else None
        return e is not None and e[0] is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.active:
            return func(*args, **kwargs)
        tensors = _tensors(args, kwargs)
        shared_in = [t for t in tensors if self.is_shared(t)]
        if not shared_in or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        frame = self.frames[-1] if self.frames else None
        if frame is not None and frame.batched and all(id(t) in frame.own for t in shared_in):
            return func(*args, **kwargs)  # a module's own parameters in its call on the examples: its rule
        roots = frozenset().union(*(self.shared[id(t)][1] for t in shared_in))
        examples = [t for t in tensors if not self.is_shared(t) and t.requires_grad]
        batchy = [t for t in tensors if not self.is_shared(t) and not t.requires_grad and t.dim() >= 1 and t.shape[0] == self.B]
        if func is Tensor.expand_as and len(args) > 1:  # the second argument gives only the shape
            examples = [t for t in examples if t is not args[1]]
            batchy = [t for t in batchy if t is not args[1]]
        if func in _BROADCASTS and not examples and args and self.is_shared(args[0]):
            out = self._broadcast(func, args, kwargs)
            if out is not None:
                self._note_uses(shared_in, frame)
                return out
        if func in _ELEMENTWISE and (examples or batchy):
            args, kwargs, ok = self._explicit_broadcast(args, kwargs, tensors)
            if ok:
                out = func(*args, **kwargs)
                self._note_uses(shared_in, frame)
                return out
        out = func(*args, **kwargs)
        outs = [o for o in (out if isinstance(out, (list, tuple)) else (out,)) if isinstance(o, Tensor)]
        if not any(o.requires_grad for o in outs):
            return out  # metadata (shape, dtype), detach, comparisons: no use
        self._note_uses(shared_in, frame)
        if examples or (batchy and self.B > 1):
            self.tainted |= roots
            for o in outs:
                self.shared.pop(id(o), None)
            return out
        for o in outs:
            if o.requires_grad:
                self.shared[id(o)] = (o, roots)
        return out

    def _note_uses(self, shared_in: list[Tensor], frame: _Frame | None) -> None:
        for t in shared_in:
            name = self.param_name.get(id(t))
            if name is not None and (frame is None or id(t) not in frame.own):
                self.direct.add(name)

    def _capture(self, s: Tensor, padded: tuple[int, ...], repeat: bool) -> Tensor:
        base = s.reshape(padded)
        t = base.repeat(self.B, *([1] * (len(padded) - 1))) if repeat else base.expand(self.B, *padded[1:])
        self.captures.append(_Capture(s, t))
        return t

    def _broadcast(self, func, args: tuple, kwargs: dict) -> Tensor | None:
        """S.repeat(B, ...) / S.expand(B, ...) (and kin) of a shared S: a capture, or None if not a batch broadcast."""
        s = args[0]
        if func is Tensor.repeat:
            sizes = args[1:] if len(args) > 2 or not isinstance(args[1] if len(args) > 1 else None, (list, tuple, torch.Size)) else args[1]
            sizes = tuple(int(v) for v in (sizes or kwargs.get("repeats", ())))
            if len(sizes) < s.dim() or not sizes or sizes[0] != self.B:
                return None
            padded = (1,) * (len(sizes) - s.dim()) + tuple(s.shape)
            t = self._capture(s, padded, repeat=True)
            rest = (1,) + sizes[1:]
            return t if all(v == 1 for v in rest) else t.repeat(*rest)
        if func in (Tensor.expand_as,):
            target = tuple(args[1].shape)
        elif func in (Tensor.expand,):
            sizes = args[1:] if len(args) > 2 or not isinstance(args[1] if len(args) > 1 else None, (list, tuple, torch.Size)) else args[1]
            sizes = tuple(int(v) for v in (sizes or kwargs.get("size", ())))
            pad = len(sizes) - s.dim()
            target = tuple(s.shape[i - pad] if (v == -1 and i >= pad) else v for i, v in enumerate(sizes))
        else:
            target = tuple(args[1] if len(args) > 1 else kwargs.get("size"))
        if not target or len(target) < s.dim() or target[0] != self.B:
            return None
        padded = (1,) * (len(target) - s.dim()) + tuple(s.shape)
        if padded[0] != 1:
            return None
        t = self._capture(s, padded, repeat=False)
        return t if tuple(t.shape) == target else t.expand(*target)

    def _explicit_broadcast(self, args: tuple, kwargs: dict, tensors: list[Tensor]) -> tuple[tuple, dict, bool]:
        """An elementwise op of shared and example tensors: shared operands expanded to the batch explicitly."""
        try:
            shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        except RuntimeError:
            return args, kwargs, False
        if len(shape) == 0 or shape[0] != self.B:
            return args, kwargs, False
        swap: dict[int, Tensor] = {}
        for t in tensors:
            if self.is_shared(t):
                padded = (1,) * (len(shape) - t.dim()) + tuple(t.shape)
                if padded[0] != 1:
                    return args, kwargs, False
                if id(t) not in swap:
                    swap[id(t)] = self._capture(t, padded, repeat=False)
        fix = lambda a: swap.get(id(a), a) if isinstance(a, Tensor) else a  # noqa: E731
        return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}, True


# --------------------------------------------------------------------------------------------------
# The accumulator
# --------------------------------------------------------------------------------------------------


def _all_fire(root: Tensor, calls: list["_Call"], frontier: list[Tensor]) -> bool:
    """Whether autograd.grad(root, frontier) provably reaches every captured output (fires its hook).

    The engine runs exactly the graph nodes from which a captured node (a frontier output's grad_fn) can
    be reached; an output's hook fires when its grad_fn runs, or when it is itself a frontier output.
    Conservative: anything unusual (leaf outputs, a frontier output sharing a multi-output node) -> False.
    """
    targets = {f.grad_fn for f in frontier}
    if None in targets or root.grad_fn is None:
        return False
    frontier_keys = {(f.grad_fn, f.output_nr) for f in frontier}
    reaches: dict[object, bool] = {}
    stack: list[tuple[object, bool]] = [(root.grad_fn, False)]
    while stack:  # iterative post-order DFS (deep models would overflow the recursion limit)
        node, expanded = stack.pop()
        if node in reaches and not expanded:
            continue
        children = [n for n, _ in node.next_functions if n is not None]
        if not expanded:
            reaches.setdefault(node, False)
            stack.append((node, True))
            stack.extend((n, False) for n in children if n not in reaches)
        else:
            reaches[node] = any(n in targets or reaches.get(n, False) for n in children)
    for c in calls:
        fn = c.output.grad_fn
        if fn is None:
            return False
        if reaches.get(fn, False):
            continue
        if (fn, c.output.output_nr) not in frontier_keys:
            return False
        if sum(1 for f in frontier if f.grad_fn is fn) != 1:  # a shared node captured, not run: unsure
            return False
    return True


@dataclass
class _Call:
    module_name: str
    input: Tensor
    output: Tensor
    input_is_root: bool  # the input needs no gradient, or is a leaf: the backward can stop here
    fired: bool = False
    combine: bool = False  # keep the output gradient (the module has other calls) instead of accumulating
    grad: Tensor | None = None


@dataclass
class _SharedCall:
    """A call of a module on a batch-shared input: output U is the same for every example."""

    module_name: str
    input: Tensor
    output: Tensor


@dataclass
class _BatchState:
    batch_size: int | None = None
    calls: list[_Call] = field(default_factory=list)
    shared_calls: list[_SharedCall] = field(default_factory=list)
    # Modules whose calls the hooks cannot credit per example (neither on the examples nor on a tracked
    # batch-shared tensor): their parameters go to the exact fallback.
    bad_modules: set[str] = field(default_factory=set)
    tracker: _SharedTracker | None = None
    layout: "_BackwardLayout | None" = None
    rows: list[tuple[int, Tensor]] = field(default_factory=list)  # (group, row indices) of this batch's examples
    grouped: bool = False  # every example of the batch is in a group: its squares go to the group sums only


@dataclass
class _BackwardLayout:
    combine: dict[str, tuple[list[_Call], list[_SharedCall]]]  # module -> its calls, combined per example
    direct: list[str]  # parameters used outside module calls, only in captured shared computations
    candidates: list[str]  # parameters to check (and, if used, run) on the exact fallback
    vjp_inputs: list[Tensor]  # shared-call outputs, then direct parameters


# Per-example cotangents of the shared sub-computation held at once (bytes, fp32): the examples are cut
# into chunks that fit.
SHARED_WORKSPACE_BYTES = 256 << 20


class SquaredGradAccumulator:
    """Accumulate sum_i (d l_i / d theta)**2 for the trainable parameters of ``model``.

    Usage::

        acc = SquaredGradAccumulator(model)
        for batch in loader:
            with acc.capture(batch_size=B):
                out = model(**batch)
                acc.backward([per_example_term])   # each term has shape (B,)
        fisher = acc.mean()                          # {param name: tensor shaped like the param}

    Each term's per-example gradients are squared and summed; several terms (e.g. the C - 1
    terms of the exact Fisher) add up. ``num_examples`` counts the examples seen. ``fallback_params``:
    the parameters that needed the exact per-example loop (none for the supported encoders).
    """

    def __init__(self, model: nn.Module, param_names: Sequence[str] | None = None, *, capture_shared: bool = True) -> None:
        self.model = model
        # False: no tracking of batch-shared computations; their parameters take the exact per-example
        # fallback (the behaviour before the capture existed; for comparisons and as an escape hatch)
        self.capture_shared = capture_shared
        wanted = set(param_names) if param_names is not None else None
        self.params: dict[str, nn.Parameter] = {
            n: p for n, p in model.named_parameters() if p.requires_grad and (wanted is None or n in wanted)
        }
        if not self.params:
            raise ValueError("fastsel: the model has no trainable parameters to accumulate")
        self.sums: dict[str, Tensor] = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.num_examples = 0
        self.fallback_params: set[str] = set()
        # Optional per-group sums (ranking confidence, fastsel.scores.confidence): enable_groups(K); the squared gradients of
        # a batch whose examples all have a group (given per batch to capture()) go to group_sums[g] of each example's
        # group g *only*, not to ``sums`` as well: the same work as without groups. totals() adds them up.
        self.group_sums: list[dict[str, Tensor]] = []
        self.group_counts: list[int] = []
        self.sums_used = False  # a batch without groups went to ``sums`` (else they are zeros nobody needs to read)
        # module name -> {param short name -> full name}; a parameter tied between modules (shared
        # embeddings) has per-example gradients summed over its uses, so no single hook can credit it.
        canonical = {id(p): n for n, p in self.params.items()}
        owners: dict[str, int] = {}
        for _, module in model.named_modules(remove_duplicate=False):
            for p in module.parameters(recurse=False):
                if id(p) in canonical:
                    owners[canonical[id(p)]] = owners.get(canonical[id(p)], 0) + 1
        self._tied = {n for n, k in owners.items() if k > 1}
        self._owned: dict[str, dict[str, str]] = {}
        self._modules: dict[str, nn.Module] = {}
        self._own_ids: dict[str, frozenset[int]] = {}
        for mname, module in model.named_modules():
            own = {
                short: canonical[id(p)]
                for short, p in module.named_parameters(recurse=False)
                if id(p) in canonical and canonical[id(p)] not in self._tied
            }
            if own:
                self._owned[mname] = own
                self._modules[mname] = module
                self._own_ids[mname] = frozenset(id(self.params[f]) for f in own.values())
                if _rule_for(module) is _GENERIC and module not in _RMS_SPECS:
                    spec = _detect_rms_norm(module)
                    if spec is not None:
                        _RMS_SPECS[module] = spec
        self._state: _BatchState | None = None

    def enable_groups(self, k: int) -> None:
        """Also keep K per-group sums (memory K x the sums); capture(groups=...) says each example's group."""
        self.group_sums = [{n: torch.zeros_like(s) for n, s in self.sums.items()} for _ in range(k)]
        self.group_counts = [0] * k

    def _group_acc(self, names: Mapping[str, str] | None = None) -> list[tuple[Tensor, dict[str, Tensor]]]:
        """(row indices, {short or full name: group sum}) of each group present in the batch."""
        st = self._state
        if st is None or not st.rows:
            return []
        if names is None:
            return [(idx, self.group_sums[k]) for k, idx in st.rows]
        return [(idx, {short: self.group_sums[k][full] for short, full in names.items()}) for k, idx in st.rows]

    # -- hooks -------------------------------------------------------------------------------------

    def _pre_hook(self, name: str, module: nn.Module, args: tuple) -> tuple | None:
        st = self._state
        if st is None:
            return None
        new = None
        if isinstance(module, nn.Embedding) and args:
            idx = args[0]
            if st.batch_size and st.batch_size > 1 and idx.dim() >= 2 and idx.shape[0] == 1:
                new = (idx.expand(st.batch_size, *idx.shape[1:]).contiguous(),) + tuple(args[1:])
        x = (new or args)[0] if (new or args) else None
        tr = st.tracker
        batched = isinstance(x, Tensor) and x.dim() >= 1 and x.shape[0] == st.batch_size and not (tr and tr.is_shared(x))
        if tr is not None:
            tr.frames.append(_Frame(name, self._own_ids[name], batched))
        return new

    def _fwd_hook(self, name: str, module: nn.Module, args: tuple, output: object) -> None:
        st = self._state
        if st is None:
            return
        tr = st.tracker
        if tr is not None and tr.frames and tr.frames[-1].module_name == name:
            tr.frames.pop()
        x = args[0] if args else None
        if tr is not None and tr.is_shared(output) and isinstance(x, Tensor) and (tr.is_shared(x) or not x.requires_grad):
            st.shared_calls.append(_SharedCall(name, x.detach(), output))
            return
        batched = (
            isinstance(x, Tensor)
            and isinstance(output, Tensor)
            and x.dim() >= 1
            and output.dim() >= 1
            and st.batch_size is not None
            and x.shape[0] == st.batch_size
            and output.shape[0] == st.batch_size
            and not (tr is not None and tr.is_shared(x))
        )
        if not batched or not output.requires_grad:
            st.bad_modules.add(name)
            return
        st.calls.append(_Call(name, x.detach(), output, not x.requires_grad or x.grad_fn is None))

    @contextlib.contextmanager
    def capture(self, batch_size: int, groups: Tensor | None = None) -> Iterator["SquaredGradAccumulator"]:
        """Hook the model for one batch of ``batch_size`` examples (forward and backward inside).

        groups: (B,) int group of each example when enable_groups() was called (else ignored).
        """
        if self._state is not None:
            raise RuntimeError("fastsel: capture() is not re-entrant")
        self._state = _BatchState(batch_size=batch_size)
        if self.group_sums and groups is not None:
            if groups.shape != (batch_size,):
                raise ValueError(f"fastsel: groups must have shape ({batch_size},), got {tuple(groups.shape)}")
            covered = 0
            for k in range(len(self.group_sums)):
                idx = (groups == k).nonzero().flatten()
                if idx.numel():
                    self._state.rows.append((k, idx))
                    self.group_counts[k] += int(idx.numel())
                    covered += int(idx.numel())
            if covered != batch_size:  # totals() = sums + the group sums needs each example in exactly one of them
                self._state = None
                raise ValueError(f"fastsel: groups must give every example a group in 0..{len(self.group_sums) - 1}")
            self._state.grouped = True
        if not self._state.grouped:
            self.sums_used = True
        handles = []
        tracker = _SharedTracker(self.params, batch_size) if self.capture_shared else None
        try:
            for mname, module in self._modules.items():
                handles.append(module.register_forward_pre_hook(lambda m, a, n=mname: self._pre_hook(n, m, a)))
                handles.append(module.register_forward_hook(lambda m, a, o, n=mname: self._fwd_hook(n, m, a, o)))
            self._state.tracker = tracker
            with tracker if tracker is not None else contextlib.nullcontext():
                yield self
        finally:
            for h in handles:
                h.remove()
            self._state = None

    # -- backward ----------------------------------------------------------------------------------

    def _make_layout(self, st: _BatchState) -> _BackwardLayout:
        """After the forward: which module calls accumulate alone, which combine, which params fall back."""
        tr = st.tracker
        if tr is not None:
            tr.frames.clear()
            tr.active = False
        tainted = tr.tainted if tr is not None else set()
        direct_used = tr.direct if tr is not None else set()
        by_module: dict[str, tuple[list[_Call], list[_SharedCall]]] = {}
        for c in st.calls:
            by_module.setdefault(c.module_name, ([], []))[0].append(c)
        for c in st.shared_calls:
            by_module.setdefault(c.module_name, ([], []))[1].append(c)
        combine: dict[str, tuple[list[_Call], list[_SharedCall]]] = {}
        direct: list[str] = []
        candidates = sorted(self._tied)
        keep_calls: list[_Call] = []
        for mname, own in self._owned.items():
            names = list(own.values())
            calls, shared = by_module.get(mname, ([], []))
            if mname in st.bad_modules or any(n in tainted or n in direct_used for n in names) and (calls or shared):
                candidates += names
                continue
            if not calls and not shared:
                for n in names:
                    (direct if n in direct_used and n not in tainted else candidates).append(n)
                continue
            if len(calls) == 1 and not shared:
                keep_calls += calls  # the fast path: one call on the examples, accumulated in its hook
                continue
            for c in calls:
                c.combine = True
            keep_calls += calls
            combine[mname] = (calls, shared)
        st.calls = keep_calls
        vjp_inputs = [sc.output for _, shared in combine.values() for sc in shared]
        vjp_inputs += [self.params[n] for n in direct]
        return _BackwardLayout(combine, direct, candidates, vjp_inputs)

    def backward(self, terms: Sequence[Tensor]) -> None:
        """Accumulate the squared per-example gradients of each per-example term (shape (B,))."""
        st = self._state
        if st is None:
            raise RuntimeError("fastsel: call backward() inside `with acc.capture(batch_size):`")
        B = st.batch_size
        for t in terms:
            if t.shape != (B,):
                raise ValueError(f"fastsel: each term must have shape ({B},), got {tuple(t.shape)}")
        if st.layout is None:
            st.layout = self._make_layout(st)
        layout = st.layout
        calls = st.calls
        captures = [c for c in (st.tracker.captures if st.tracker is not None else []) if c.expanded.requires_grad]
        if not layout.vjp_inputs:
            captures = []
        # Backward only to the earliest captured outputs: everything downstream of them runs and fires
        # its hook, and no parameter gradient is computed (except those of fallback candidates, if any).
        frontier = [c.output for c in calls if c.input_is_root] or [c.output for c in calls]
        expanded = [c.expanded for c in captures]
        deferred = layout.candidates
        deferred_params = [self.params[n] for n in deferred]
        for k, term in enumerate(terms):
            for c in calls:
                c.fired = False
                c.grad = None
            total = term.sum()
            # The last pass frees the graph as it goes (like a plain backward: activations are released
            # layer by layer) when nothing needs it afterwards: no fallback, and every hook provably fires.
            # The shared sub-computation behind a capture survives: the engine stops at T (an input of the
            # grad call) and never runs, hence never frees, the nodes behind it; the batched VJP needs them.
            last = k == len(terms) - 1 and not deferred_params and _all_fire(total, calls, frontier)
            hooks = [c.output.register_hook(self._grad_hook(c, release=last)) for c in calls]
            inputs = frontier + expanded + deferred_params
            try:
                grads = torch.autograd.grad(total, inputs, retain_graph=not last, allow_unused=True) if inputs else ()
                # Outputs off every path to the frontier (fed only by uncaptured parameters) did not fire.
                missed = [c.output for c in calls if not c.fired]
                if missed and last:
                    raise RuntimeError("fastsel: internal error: a captured output was not reached by the backward")
                if missed:
                    torch.autograd.grad(term.sum(), missed, retain_graph=True, allow_unused=True)
            finally:
                for h in hooks:
                    h.remove()
            cots = grads[len(frontier) : len(frontier) + len(expanded)]
            self._shared_and_combined(layout, captures, cots, B)
            used = [n for n, g in zip(deferred, grads[len(frontier) + len(expanded) :]) if g is not None]
            if used:
                self.fallback_params.update(used)
                self._per_example_fallback(term, used)
        self.num_examples += B
        st.calls.clear()

    def _shared_and_combined(self, layout: _BackwardLayout, captures: list[_Capture], cots: Sequence[Tensor | None], B: int) -> None:
        """Per-example gradients through the batch-shared sub-computation (a batched vector-Jacobian product
        of the captured cotangents), combined with each module's calls on the examples, squared, summed."""
        if not layout.combine and not layout.direct:
            return
        pairs = [(c.shared, g.reshape(B, *c.shared.shape)) for c, g in zip(captures, cots) if g is not None]
        per_example = sum(t.numel() for t in layout.vjp_inputs) * 4
        chunk = max(1, min(B, SHARED_WORKSPACE_BYTES // max(per_example, 1))) if pairs else B
        n_shared = sum(len(shared) for _, shared in layout.combine.values())
        for b0 in range(0, B, chunk):
            b1 = min(B, b0 + chunk)
            vj: Sequence[Tensor | None] = [None] * len(layout.vjp_inputs)
            if pairs:
                vj = torch.autograd.grad(
                    [s for s, _ in pairs], layout.vjp_inputs, [g[b0:b1] for _, g in pairs],
                    retain_graph=True, allow_unused=True, is_grads_batched=True,
                )
            for n, g in zip(layout.direct, vj[n_shared:]):
                if g is not None:
                    sq = g.float().square()
                    if not self._grouped():
                        self.sums[n].add_(sq.sum(0))
                    for idx, gacc in self._group_rows(b0, b1):
                        gacc[n].add_(sq.index_select(0, idx).sum(0))
            k = 0
            for mname, (calls, shared) in layout.combine.items():
                self._combine(mname, calls, list(zip(shared, vj[k : k + len(shared)])), b0, b1)
                k += len(shared)

    def _combine(self, mname: str, calls: list[_Call], shared: list[tuple[_SharedCall, Tensor | None]], b0: int, b1: int) -> None:
        module = self._modules[mname]
        own = self._owned[mname]
        acc = {short: self.sums[full] for short, full in own.items()}
        rule = _rule_for(module)
        nb = b1 - b0
        items = [(c.input[b0:b1], c.grad[b0:b1], True) for c in calls if c.grad is not None]
        items += [(sc.input, g, False) for sc, g in shared if g is not None]
        if not items:
            return
        if rule.features is None:  # generic: per-example gradients of each call, summed, squared
            total: dict[str, Tensor] = {}
            for x, g, batched in items:
                for n, gr in _generic_per_example(module, x, g, list(acc), batched).items():
                    total[n] = total[n] + gr.float() if n in total else gr.float()
            for n, gr in total.items():
                sq = gr.square()
                if not self._grouped():
                    acc[n].add_(sq.sum(0))
                for idx, gacc in self._group_rows(b0, b1, own):
                    gacc[n].add_(sq.index_select(0, idx).sum(0))
            return
        width = rule.grad_width(module)
        phis, gs = [], []
        for x, g, batched in items:
            phi = rule.features(module, x)
            if batched:
                phi = phi.reshape(nb, -1) if phi.dim() == 1 else phi.reshape(nb, -1, phi.shape[-1])
            else:
                phi = phi.reshape(1, -1).expand(nb, -1) if phi.dim() == 1 else phi.reshape(1, -1, phi.shape[-1]).expand(nb, -1, -1)
            phis.append(phi if phi.dim() == 2 else phi.float())
            gs.append(g.reshape(nb, -1, width).float())
        phi_all, g_all = torch.cat(phis, 1), torch.cat(gs, 1)
        if not self._grouped():
            rule.accumulate_rows(module, phi_all, g_all, acc)
        for idx, gacc in self._group_rows(b0, b1, own):
            rule.accumulate_rows(module, phi_all.index_select(0, idx), g_all.index_select(0, idx), gacc)

    def _group_rows(self, b0: int, b1: int, names: Mapping[str, str] | None = None) -> list[tuple[Tensor, dict[str, Tensor]]]:
        """_group_acc restricted to rows b0:b1 of the batch, as indices relative to b0."""
        out = []
        for idx, gacc in self._group_acc(names):
            sel = idx[(idx >= b0) & (idx < b1)] - b0
            if sel.numel():
                out.append((sel, gacc))
        return out

    def _grad_hook(self, call: _Call, release: bool = False) -> Callable[[Tensor], None]:
        """The hook on ``call.output``; ``release``: drop the saved input once used (the last pass)."""
        module = self._modules[call.module_name]
        own = self._owned[call.module_name]
        acc = {short: self.sums[full] for short, full in own.items()}
        rule = _rule_for(module)

        def hook(grad: Tensor) -> None:
            if not call.fired:
                call.fired = True
                if call.combine:
                    call.grad = grad.detach()
                    return
                if not self._grouped():
                    rule.accumulate(module, call.input, grad, acc)
                for idx, gacc in self._group_acc(own):
                    rule.accumulate(module, call.input.index_select(0, idx), grad.index_select(0, idx), gacc)
                if release:  # let the activations go as the backward moves on
                    call.input = call.output = None  # type: ignore[assignment]

        return hook

    def _per_example_fallback(self, term: Tensor, names: list[str]) -> None:
        params = [self.params[n] for n in names]
        for b in range(term.shape[0]):
            grads = torch.autograd.grad(term[b], params, retain_graph=True, allow_unused=True)
            group = [gacc for idx, gacc in self._group_acc() if bool((idx == b).any())]
            for n, g in zip(names, grads):
                if g is not None:
                    if not group:
                        self.sums[n].add_(g.float().square())
                    for gacc in group:
                        gacc[n].add_(g.float().square())

    # -- results -----------------------------------------------------------------------------------

    def _grouped(self) -> bool:
        return self._state is not None and self._state.grouped

    def totals(self) -> dict[str, Tensor]:
        """The sum of every example's squared gradients: ``sums`` (batches without groups) plus every group's sums."""
        if not self.group_sums:
            return self.sums
        first, *rest = self.group_sums
        out = {n: (s + first[n]) if self.sums_used else first[n].clone() for n, s in self.sums.items()}
        for g in rest:
            for n, t in g.items():
                out[n].add_(t)
        return out

    def mean(self) -> dict[str, Tensor]:
        """The Fisher diagonal estimate: the accumulated totals divided by the number of examples."""
        if self.num_examples == 0:
            raise ValueError("fastsel: no examples were accumulated")
        return {n: s / self.num_examples for n, s in self.totals().items()}

    def state_dict(self) -> dict[str, object]:
        """What resuming needs: ``sums`` only when a batch without groups filled them (else they are all zeros)."""
        sums = self.sums if self.sums_used or not self.group_sums else {}
        state = {"sums": sums, "num_examples": self.num_examples, "fallback_params": sorted(self.fallback_params)}
        if self.group_sums:
            state["group_sums"] = self.group_sums
            state["group_counts"] = list(self.group_counts)
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        for n, t in state["sums"].items():  # type: ignore[union-attr]
            self.sums[n].copy_(t)
        self.sums_used = bool(state["sums"])
        self.num_examples = int(state["num_examples"])  # type: ignore[arg-type]
        self.fallback_params = set(state.get("fallback_params", []))  # type: ignore[union-attr]
        if self.group_sums:
            saved = state.get("group_sums")
            if saved is None or len(saved) != len(self.group_sums):  # type: ignore[arg-type]
                raise ValueError("fastsel: the checkpoint has no (or other) per-group Fisher sums")
            for mine, theirs in zip(self.group_sums, saved):  # type: ignore[arg-type]
                for n, t in theirs.items():
                    mine[n].copy_(t)
            self.group_counts = [int(c) for c in state["group_counts"]]  # type: ignore[union-attr]
