"""The per-example engine: per-example squared gradients of any torch module, from ONE batched backward.

``SquaredGradAccumulator`` hooks every module that owns trainable parameters. The forward hooks keep each
layer's input; a hook on each layer's output receives dL/d(output) during the backward and hands (input,
output-gradient) to the rule for that layer type (:mod:`fastsel.capture.rules`), which adds sum_b g_b**2
into the fp32 sums of :mod:`fastsel.capture.accumulator` through the fused ops of :mod:`fastsel.ops`.
Per-example gradients of the whole model are never materialised, and the backward computes no parameter
gradients at all (only activation gradients), so a pass costs about one training step. Linears that read one
input (Q, K and V) are accumulated together, in one call of the linear op with their rows stacked.

Batch-shared computations (parameters used outside a call of their own module, e.g. DeBERTa's
relative-position table, or a module called on such a parameter-only tensor) are followed during the
forward by the tracker (:mod:`fastsel.capture.tracker`); where one meets the examples by a broadcast, the
backward takes the per-example cotangent there and a batched vector-Jacobian product through the shared
sub-computation turns it into exact per-example gradients of its parameters. A module with several calls
(on the examples and on a shared tensor, or twice) combines them per example before squaring. Only what
the hooks and the tracker cannot credit per example goes to the exact fallback (a per-example backward
restricted to those parameters, listed in ``fallback_params``): parameters tied between modules, shared
tensors that meet the examples other than by a broadcast (a matmul, say), modules called on inputs that
are neither the batch nor tracked, and everything shared when ``capture_shared=False``.

Embedding indices with a batch dimension of 1 (HF's position ids of shape (1, T)) are expanded to the
batch before the lookup: otherwise their gradients arrive summed over the batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fastsel.capture.accumulator import Destination, GroupMembers, SquaredGradSums
from fastsel.capture.rules import (
    GENERIC,
    FeatureRule,
    GenericRule,
    LinearRule,
    recognise_rms_norm,
    rule_for,
)
from fastsel.capture.tracker import Capture, Frame, SharedTracker
from fastsel.utils.groups import take_rows

__all__ = ["SquaredGradAccumulator"]


def _all_fire(root: Tensor, calls: list["_Call"], frontier: list[Tensor]) -> bool:
    """Whether autograd.grad(root, frontier) provably reaches every captured output (fires its hook).

    The engine runs exactly the graph nodes from which a captured node (a frontier output's grad_fn) can
    be reached; an output's hook fires when its grad_fn runs, or when it is itself a frontier output that the
    root reaches (one it does not reach gets no gradient: an output the loss never uses).
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
        if (fn, c.output.output_nr) not in frontier_keys or fn not in reaches:  # reaches: every node under root
            return False
        if sum(1 for f in frontier if f.grad_fn is fn) != 1:  # a shared node captured, not run: unsure
            return False
    return True


@dataclass
class _Call:
    """A call of a module on the examples: input x (B, ...), output (B, ...)."""

    module_name: str
    input: Tensor
    output: Tensor
    input_is_root: bool  # the input needs no gradient, or is a leaf: the backward can stop here
    fired: bool = False
    keep_grad: bool = False  # the module has other calls: keep the output gradient to combine, do not accumulate
    grad: Tensor | None = None


@dataclass
class _SharedCall:
    """A call of a module on a batch-shared input: output U is the same for every example."""

    module_name: str
    input: Tensor
    output: Tensor


@dataclass
class _BatchState:
    """What the hooks record during one capture() (one batch of ``batch_size`` examples)."""

    batch_size: int | None = None
    calls: list[_Call] = field(default_factory=list)
    shared_calls: list[_SharedCall] = field(default_factory=list)
    # Modules whose calls the hooks cannot credit per example (neither on the examples nor on a tracked
    # batch-shared tensor): their parameters go to the exact fallback.
    bad_modules: set[str] = field(default_factory=set)
    tracker: SharedTracker | None = None
    layout: "_BackwardLayout | None" = None
    members: GroupMembers = None  # the examples of each group in the batch; None: a batch without groups
    input_groups: "_SharedInputGroups | None" = None  # during one backward pass


@dataclass
class _BackwardLayout:
    """How the backward credits each parameter, decided once per batch after the forward."""

    combined: dict[str, tuple[list[_Call], list[_SharedCall]]]  # module -> its calls, combined per example
    direct: list[str]  # parameters used outside module calls, only in captured shared computations
    candidates: list[str]  # parameters to check (and, if used, run) on the exact fallback
    vjp_inputs: list[Tensor]  # shared-call outputs, then direct parameters


def _input_key(x: Tensor) -> tuple:
    """The same input read by several calls (detached views of one tensor)."""
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)


class _SharedInputGroups:
    """Linear calls that read one input (Q, K and V on one hidden state), accumulated in one call of the linear op
    (:meth:`LinearRule.accumulate_shared_input`): each member's output gradient is held when its hook fires and the
    last to arrive accumulates them all. Lives for one backward pass; :meth:`flush` accumulates the members of a
    group some of whose outputs the backward did not reach."""

    def __init__(self, calls: Sequence[_Call], modules: dict[str, nn.Module], owned: dict[str, dict[str, str]]) -> None:
        by_input: dict[tuple, list[_Call]] = {}
        for c in calls:  # the fast-path calls whose weight the linear op accumulates from their input, by one rule
            rule = rule_for(modules[c.module_name])
            if not c.keep_grad and "weight" in owned[c.module_name] and isinstance(rule, LinearRule):
                by_input.setdefault((_input_key(c.input), id(rule)), []).append(c)
        self._group: dict[int, list[_Call]] = {id(c): g for g in by_input.values() if len(g) > 1 for c in g}
        self._held: dict[int, list[tuple[_Call, Tensor]]] = {}  # id(group) -> the members arrived, with their gradients

    def arrive(self, call: _Call, grad: Tensor) -> list[tuple[_Call, Tensor]] | None:
        """None: ``call`` is in no group (accumulate it alone). Else [] while members are still to come, then every
        member with its gradient, once, when the last arrives."""
        group = self._group.get(id(call))
        if group is None:
            return None
        held = self._held.setdefault(id(group), [])
        held.append((call, grad))
        if len(held) < len(group):
            return []
        return self._held.pop(id(group))

    def flush(self) -> list[list[tuple[_Call, Tensor]]]:
        """The groups some of whose members never arrived, each with the members that did."""
        left, self._held = list(self._held.values()), {}
        return left


# Per-example cotangents of the shared sub-computation held at once (bytes, fp32): the examples are cut
# into chunks that fit.
SHARED_WORKSPACE_BYTES = 256 << 20


class SquaredGradAccumulator(SquaredGradSums):
    """Accumulate sum_i (d l_i / d theta)**2 for the trainable parameters of ``model``.

    Usage::

        acc = SquaredGradAccumulator(model)
        for batch in loader:
            with acc.capture(batch_size=B):
                out = model(**batch)
                acc.backward([per_example_term])   # each term has shape (B,)
        fisher = acc.mean()                          # {param name: tensor shaped like the param}

    Each term's per-example gradients are squared and summed; several terms (e.g. the C - 1
    terms of the exact Fisher) add up. The sums, groups and results are those of
    :class:`~fastsel.capture.accumulator.SquaredGradSums`; ``fallback_params``: the parameters that needed
    the exact per-example loop (none for the supported encoders).
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
        super().__init__(self.params)
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
                if rule_for(module) is GENERIC:
                    recognise_rms_norm(module)
        self._state: _BatchState | None = None
        self._hook_handles: list[RemovableHandle] | None = None  # registered by hooked(), kept across batches

    def _destinations(self, names: dict[str, str] | None = None, start: int = 0, stop: int | None = None) -> list[Destination]:
        """The accumulator's destinations for examples start:stop of the current batch (see SquaredGradSums)."""
        return self.destinations(self._state.members, names, start, stop)  # type: ignore[union-attr]

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
            tr.frames.append(Frame(name, self._own_ids[name], batched))
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

    def _register_hooks(self) -> list[RemovableHandle]:
        handles = []
        for mname, module in self._modules.items():
            handles.append(module.register_forward_pre_hook(lambda m, a, n=mname: self._pre_hook(n, m, a)))
            handles.append(module.register_forward_hook(lambda m, a, o, n=mname: self._fwd_hook(n, m, a, o)))
        return handles

    @contextlib.contextmanager
    def hooked(self) -> Iterator["SquaredGradAccumulator"]:
        """Keep the module hooks registered across the batches inside (one registration for a whole pass, not one per
        :meth:`capture`); they do nothing outside a capture. Nested: the outer one holds them."""
        if self._hook_handles is not None:
            yield self
            return
        self._hook_handles = self._register_hooks()
        try:
            yield self
        finally:
            for h in self._hook_handles:
                h.remove()
            self._hook_handles = None

    @contextlib.contextmanager
    def capture(self, batch_size: int, groups: Tensor | None = None) -> Iterator["SquaredGradAccumulator"]:
        """Hook the model for one batch of ``batch_size`` examples (forward and backward inside).

        groups: (B,) int group of each example when enable_groups() was called (else ignored).
        """
        if self._state is not None:
            raise RuntimeError("fastsel: capture() is not re-entrant")
        members = self.group_members(batch_size, groups)
        self._state = _BatchState(batch_size=batch_size, members=members)
        handles = self._register_hooks() if self._hook_handles is None else []
        tracker = SharedTracker(self.params, batch_size) if self.capture_shared else None
        try:
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
        combined: dict[str, tuple[list[_Call], list[_SharedCall]]] = {}
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
                c.keep_grad = True
            keep_calls += calls
            combined[mname] = (calls, shared)
        st.calls = keep_calls
        vjp_inputs = [sc.output for _, shared in combined.values() for sc in shared]
        vjp_inputs += [self.params[n] for n in direct]
        return _BackwardLayout(combined, direct, candidates, vjp_inputs)

    def backward(self, terms: Sequence[Tensor]) -> None:
        """terms: [(B,) per-example terms, ...]: each term's per-example gradients, squared, added to the sums."""
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
            st.input_groups = groups = _SharedInputGroups(calls, self._modules, self._owned)
            try:
                grads = torch.autograd.grad(total, inputs, retain_graph=not last, allow_unused=True) if inputs else ()
                # Outputs off every path to the frontier (fed only by uncaptured parameters) did not fire.
                missed = [c.output for c in calls if not c.fired]
                if missed and last:
                    raise RuntimeError("fastsel: internal error: a captured output was not reached by the backward")
                if missed:
                    torch.autograd.grad(term.sum(), missed, retain_graph=True, allow_unused=True)
                for members in groups.flush():  # members whose partners got no gradient (theirs is zero)
                    self._accumulate_shared_input(members, release=last)
            finally:
                st.input_groups = None
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

    def _shared_and_combined(self, layout: _BackwardLayout, captures: list[Capture], cots: Sequence[Tensor | None], B: int) -> None:
        """Per-example gradients through the batch-shared sub-computation (a batched vector-Jacobian product
        of the captured cotangents), combined with each module's calls on the examples, squared, summed."""
        if not layout.combined and not layout.direct:
            return
        pairs = [(c.shared, g.reshape(B, *c.shared.shape)) for c, g in zip(captures, cots) if g is not None]
        per_example = sum(t.numel() for t in layout.vjp_inputs) * 4
        chunk = max(1, min(B, SHARED_WORKSPACE_BYTES // max(per_example, 1))) if pairs else B
        n_shared = sum(len(shared) for _, shared in layout.combined.values())
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
                    for examples, dst in self._destinations({n: n}, b0, b1):
                        dst[n].add_(take_rows(sq, examples).sum(0))
            k = 0
            for mname, (calls, shared) in layout.combined.items():
                self._combine(mname, calls, list(zip(shared, vj[k : k + len(shared)])), b0, b1)
                k += len(shared)

    def _combine(self, mname: str, calls: list[_Call], shared: list[tuple[_SharedCall, Tensor | None]], b0: int, b1: int) -> None:
        """Examples b0:b1 of a module's calls on the examples (their kept output gradients) and on shared inputs
        (the per-example cotangents of their outputs, (b1 - b0, *output.shape)): summed per example, squared."""
        module = self._modules[mname]
        own = self._owned[mname]
        rule = rule_for(module)
        nb = b1 - b0
        items = [(c.input[b0:b1], c.grad[b0:b1], True) for c in calls if c.grad is not None]
        items += [(sc.input, g, False) for sc, g in shared if g is not None]
        if not items:
            return
        if not isinstance(rule, FeatureRule):  # per-example gradients of each call by torch.func, summed, squared
            total: dict[str, Tensor] = {}
            for x, g, batched in items:
                for n, gr in GenericRule.per_example_grads(module, x, g, list(own), batched).items():
                    total[n] = total[n] + gr.float() if n in total else gr.float()
            squares = {n: gr.square() for n, gr in total.items()}
            for examples, dst in self._destinations(own, b0, b1):
                for n, acc in dst.items():
                    if n in squares:
                        acc.add_(take_rows(squares[n], examples).sum(0))
            return
        # Feature rules: a shared call's positions are the same for every example (expanded, not copied).
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
        for examples, dst in self._destinations(own, b0, b1):
            rule.accumulate_features(module, take_rows(phi_all, examples), take_rows(g_all, examples), dst)

    def _grad_hook(self, call: _Call, release: bool = False) -> Callable[[Tensor], None]:
        """The hook on ``call.output``; ``release``: drop the saved input once used (the last pass)."""
        module = self._modules[call.module_name]
        rule = rule_for(module)
        destinations = self._destinations(self._owned[call.module_name])

        def hook(grad: Tensor) -> None:
            if not call.fired:
                call.fired = True
                if call.keep_grad:
                    call.grad = grad.detach()
                    return
                st = self._state
                members = st.input_groups.arrive(call, grad) if st is not None and st.input_groups is not None else None
                if members is not None:  # one of several Linears reading one input: accumulated with them
                    if members:
                        self._accumulate_shared_input(members, release)
                    return
                for examples, dst in destinations:
                    rule.accumulate(module, take_rows(call.input, examples), take_rows(grad, examples), dst)
                if release:  # let the activations go as the backward moves on
                    call.input = call.output = None  # type: ignore[assignment]

        return hook

    def _accumulate_shared_input(self, members: list[tuple[_Call, Tensor]], release: bool) -> None:
        """Linear calls on one input with their output gradients: their sums in one linear-op call per destination
        (the destinations are the same example subsets for every member: one batch, one block's parameters)."""
        calls = [c for c, _ in members]
        rule = rule_for(self._modules[calls[0].module_name])  # one LinearRule for the group
        assert isinstance(rule, LinearRule)
        dests = [self._destinations(self._owned[c.module_name]) for c in calls]
        aligned = all(len(d) == len(dests[0]) and all(e is f for (e, _), (f, _) in zip(d, dests[0])) for d in dests)
        if aligned:
            for parts in zip(*dests):
                examples = parts[0][0]
                rule.accumulate_shared_input(take_rows(calls[0].input, examples),
                                               [take_rows(g, examples) for _, g in members], [dst for _, dst in parts])
        else:  # members whose parameters go to different groups' sums: each alone
            for (c, g), d in zip(members, dests):
                for examples, dst in d:
                    rule.accumulate(self._modules[c.module_name], take_rows(c.input, examples), take_rows(g, examples), dst)
        if release:
            for c in calls:
                c.input = c.output = None  # type: ignore[assignment]

    def _per_example_fallback(self, term: Tensor, names: list[str]) -> None:
        params = [self.params[n] for n in names]
        for b in range(term.shape[0]):
            grads = torch.autograd.grad(term[b], params, retain_graph=True, allow_unused=True)
            # the plain sums, or example b's group (grouped parameters)
            destinations = self._destinations({n: n for n in names}, b, b + 1)
            for n, g in zip(names, grads):
                if g is not None:
                    for _, dst in destinations:
                        if n in dst:
                            dst[n].add_(g.float().square())
