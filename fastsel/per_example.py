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
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from fastsel import ops

__all__ = ["SquaredGradAccumulator", "RULES", "Rule"]


# --------------------------------------------------------------------------------------------------
# Rules: (module, input, grad_output, accumulators) -> None
# --------------------------------------------------------------------------------------------------

AccumulateFn = Callable[[nn.Module, Tensor, Tensor, dict[str, Tensor]], None]


@dataclass(frozen=True)
class Rule:
    """How to accumulate the per-example squared gradients of one module type's own parameters."""

    accumulate: AccumulateFn


def _linear(module: nn.Linear, x: Tensor, g: Tensor, acc: dict[str, Tensor]) -> None:
    if "weight" in acc:
        ops.accumulate_linear_sq_grad(acc["weight"], g, x)
    if "bias" in acc:
        ops.accumulate_norm_sq_grad(acc["bias"], g, None)


def _layer_norm(module: nn.LayerNorm, x: Tensor, g: Tensor, acc: dict[str, Tensor]) -> None:
    dims = tuple(range(-len(module.normalized_shape), 0))
    xf = x.float()
    x_hat = (xf - xf.mean(dims, keepdim=True)) * torch.rsqrt(xf.var(dims, unbiased=False, keepdim=True) + module.eps)
    flat = module.weight.numel() if module.weight is not None else module.bias.numel()
    g2 = g.reshape(g.shape[0], -1, flat)
    if "weight" in acc:
        ops.accumulate_norm_sq_grad(acc["weight"].view(-1), g2, x_hat.reshape(g2.shape))
    if "bias" in acc:
        ops.accumulate_norm_sq_grad(acc["bias"].view(-1), g2, None)


def _embedding(module: nn.Embedding, idx: Tensor, g: Tensor, acc: dict[str, Tensor]) -> None:
    pad = module.padding_idx if module.padding_idx is not None else -1
    ops.accumulate_embedding_sq_grad(acc["weight"], g, idx, pad)


def _generic(module: nn.Module, x: Tensor, g: Tensor, acc: dict[str, Tensor], chunk: int = 16) -> None:
    """Any module with its own parameters: per-example gradients of this module alone, by torch.func."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if n in acc}

    def dot(p: dict[str, Tensor], xb: Tensor, gb: Tensor) -> Tensor:
        return (functional_call(module, p, (xb.unsqueeze(0),)) * gb.unsqueeze(0)).sum()

    per_example = vmap(grad(dot), in_dims=(None, 0, 0))
    for start in range(0, x.shape[0], chunk):
        grads = per_example(params, x[start : start + chunk], g[start : start + chunk])
        for n, gr in grads.items():
            acc[n].add_(gr.float().square().sum(0))


RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: Rule(_linear),
    nn.LayerNorm: Rule(_layer_norm),
    nn.Embedding: Rule(_embedding),
}
_GENERIC = Rule(_generic)


def _rule_for(module: nn.Module) -> Rule:
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls]
    return _GENERIC


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


@dataclass
class _BatchState:
    batch_size: int | None = None
    calls: list[_Call] = field(default_factory=list)
    # Modules whose parameters the hooks cannot credit per example: called on inputs without the batch
    # dimension (shared by the batch), or called more than once (their per-example gradients add up
    # before squaring).
    shared_modules: set[str] = field(default_factory=set)
    called_modules: set[str] = field(default_factory=set)


class SquaredGradAccumulator:
    """Accumulate sum_i (d l_i / d theta)**2 for the trainable parameters of ``model``.

    Usage::

        acc = SquaredGradAccumulator(model)
        for batch in loader:
            with acc.capture(batch_size=B):
                out = model(**batch)
                acc.backward([per_example_term])   # each term has shape (B,)
        fisher = acc.mean()                          # {param name: tensor shaped like the param}

    Each term's per-example gradients are squared and summed; several terms (e.g. one per class,
    pre-weighted by sqrt(p_c)) add up. ``num_examples`` counts the examples seen.
    """

    def __init__(self, model: nn.Module, param_names: Sequence[str] | None = None) -> None:
        self.model = model
        wanted = set(param_names) if param_names is not None else None
        self.params: dict[str, nn.Parameter] = {
            n: p for n, p in model.named_parameters() if p.requires_grad and (wanted is None or n in wanted)
        }
        if not self.params:
            raise ValueError("fastsel: the model has no trainable parameters to accumulate")
        self.sums: dict[str, Tensor] = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.num_examples = 0
        self.fallback_params: set[str] = set()
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
        for mname, module in model.named_modules():
            own = {
                short: canonical[id(p)]
                for short, p in module.named_parameters(recurse=False)
                if id(p) in canonical and canonical[id(p)] not in self._tied
            }
            if own:
                self._owned[mname] = own
                self._modules[mname] = module
        self._state: _BatchState | None = None

    # -- hooks -------------------------------------------------------------------------------------

    def _pre_hook(self, name: str, module: nn.Module, args: tuple) -> tuple | None:
        st = self._state
        if st is None or not isinstance(module, nn.Embedding) or not args:
            return None
        idx = args[0]
        if st.batch_size and st.batch_size > 1 and idx.dim() >= 2 and idx.shape[0] == 1:
            return (idx.expand(st.batch_size, *idx.shape[1:]).contiguous(),) + tuple(args[1:])
        return None

    def _fwd_hook(self, name: str, module: nn.Module, args: tuple, output: object) -> None:
        st = self._state
        if st is None:
            return
        if name in st.called_modules:
            st.shared_modules.add(name)
        st.called_modules.add(name)
        x = args[0] if args else None
        batched = (
            isinstance(x, Tensor)
            and isinstance(output, Tensor)
            and x.dim() >= 1
            and output.dim() >= 1
            and st.batch_size is not None
            and x.shape[0] == st.batch_size
            and output.shape[0] == st.batch_size
        )
        if not batched or not output.requires_grad:
            st.shared_modules.add(name)
            return
        st.calls.append(_Call(name, x.detach(), output, not x.requires_grad or x.grad_fn is None))

    @contextlib.contextmanager
    def capture(self, batch_size: int) -> Iterator["SquaredGradAccumulator"]:
        """Hook the model for one batch of ``batch_size`` examples (forward and backward inside)."""
        if self._state is not None:
            raise RuntimeError("fastsel: capture() is not re-entrant")
        self._state = _BatchState(batch_size=batch_size)
        handles = []
        try:
            for mname, module in self._modules.items():
                handles.append(module.register_forward_pre_hook(lambda m, a, n=mname: self._pre_hook(n, m, a)))
                handles.append(module.register_forward_hook(lambda m, a, o, n=mname: self._fwd_hook(n, m, a, o)))
            yield self
        finally:
            for h in handles:
                h.remove()
            self._state = None

    # -- backward ----------------------------------------------------------------------------------

    def backward(self, terms: Sequence[Tensor]) -> None:
        """Accumulate the squared per-example gradients of each per-example term (shape (B,))."""
        st = self._state
        if st is None:
            raise RuntimeError("fastsel: call backward() inside `with acc.capture(batch_size):`")
        B = st.batch_size
        for t in terms:
            if t.shape != (B,):
                raise ValueError(f"fastsel: each term must have shape ({B},), got {tuple(t.shape)}")
        calls = [c for c in st.calls if c.module_name not in st.shared_modules]
        # Parameters the hooks do not see per example: handled by the exact fallback below.
        hooked = {c.module_name for c in calls}
        deferred = sorted(self._tied) + [
            full for mname, own in self._owned.items() if mname not in hooked for full in own.values()
        ]
        # Backward only to the earliest captured outputs: everything downstream of them runs and fires
        # its hook, and no parameter gradient is computed (except those of deferred params, if any).
        frontier = [c.output for c in calls if c.input_is_root] or [c.output for c in calls]
        deferred_params = [self.params[n] for n in deferred]
        for k, term in enumerate(terms):
            for c in calls:
                c.fired = False
            total = term.sum()
            # The last pass frees the graph as it goes (like a plain backward: activations are released
            # layer by layer) when nothing needs it afterwards: no fallback, and every hook provably fires.
            last = k == len(terms) - 1 and not deferred_params and _all_fire(total, calls, frontier)
            hooks = [c.output.register_hook(self._grad_hook(c, release=last)) for c in calls]
            try:
                grads = torch.autograd.grad(total, frontier + deferred_params, retain_graph=not last, allow_unused=True)
                # Outputs off every path to the frontier (fed only by uncaptured parameters) did not fire.
                missed = [c.output for c in calls if not c.fired]
                if missed and last:
                    raise RuntimeError("fastsel: internal error: a captured output was not reached by the backward")
                if missed:
                    torch.autograd.grad(term.sum(), missed, retain_graph=True, allow_unused=True)
            finally:
                for h in hooks:
                    h.remove()
            used = [n for n, g in zip(deferred, grads[len(frontier) :]) if g is not None]
            if used:
                self.fallback_params.update(used)
                self._per_example_fallback(term, used)
        self.num_examples += B
        st.calls.clear()

    def _grad_hook(self, call: _Call, release: bool = False) -> Callable[[Tensor], None]:
        """The hook on ``call.output``; ``release``: drop the saved input once used (the last pass)."""
        module = self._modules[call.module_name]
        own = self._owned[call.module_name]
        acc = {short: self.sums[full] for short, full in own.items()}
        rule = _rule_for(module)

        def hook(grad: Tensor) -> None:
            if not call.fired:
                call.fired = True
                rule.accumulate(module, call.input, grad, acc)
                if release:  # let the activations go as the backward moves on
                    call.input = call.output = None  # type: ignore[assignment]

        return hook

    def _per_example_fallback(self, term: Tensor, names: list[str]) -> None:
        params = [self.params[n] for n in names]
        for b in range(term.shape[0]):
            grads = torch.autograd.grad(term[b], params, retain_graph=True, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    self.sums[n].add_(g.float().square())

    # -- results -----------------------------------------------------------------------------------

    def mean(self) -> dict[str, Tensor]:
        """The Fisher diagonal estimate: accumulated sums divided by the number of examples."""
        if self.num_examples == 0:
            raise ValueError("fastsel: no examples were accumulated")
        return {n: s / self.num_examples for n, s in self.sums.items()}

    def state_dict(self) -> dict[str, object]:
        return {"sums": self.sums, "num_examples": self.num_examples, "fallback_params": sorted(self.fallback_params)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        for n, t in state["sums"].items():  # type: ignore[union-attr]
            self.sums[n].copy_(t)
        self.num_examples = int(state["num_examples"])  # type: ignore[arg-type]
        self.fallback_params = set(state.get("fallback_params", []))  # type: ignore[union-attr]
