"""The shared-parameter tracker: follows, during the forward, the tensors computed from parameters alone (the
same for every example, e.g. a relative-position table run through a projection once per batch), and makes
each place where one meets the examples an explicit broadcast whose gradient is the per-example cotangent.

The engine (:mod:`fastsel.capture.per_example`) pushes a :class:`Frame` for every hooked module call, reads
``captures`` (the explicit broadcasts), ``direct`` (parameters used outside their own module's call) and
``tainted`` (parameters whose shared tensors met the examples in a way that cannot be captured) after the
forward, and turns the tracker off (``active = False``) for the backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["SharedTracker", "Frame", "Capture"]

# Ops that broadcast a shared tensor to the batch explicitly, and the elementwise ops whose implicit broadcast
# against a (B, ...) tensor is rewritten as an explicit one: both have a gradient that is a plain per-example sum.
_BROADCASTS = {Tensor.repeat, Tensor.expand, Tensor.expand_as, torch.broadcast_to, Tensor.broadcast_to}
_ELEMENTWISE = {
    torch.add, torch.sub, torch.mul, torch.div, torch.subtract, torch.multiply, torch.true_divide,
    Tensor.add, Tensor.sub, Tensor.mul, Tensor.div, Tensor.__add__, Tensor.__radd__, Tensor.__sub__,
    Tensor.__rsub__, Tensor.__mul__, Tensor.__rmul__, Tensor.__truediv__, Tensor.__rtruediv__,
}


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensor arguments of an op, one level into lists and tuples (torch.cat's, say)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, Tensor))
    return out


@dataclass
class Frame:
    """One hooked module call in progress (the engine pushes it in the pre-hook, pops it in the hook)."""

    module_name: str
    own: frozenset[int]  # ids of the module's own tracked parameters
    batched: bool  # called on the examples (first input (B, ...), not a batch-shared tensor)


@dataclass
class Capture:
    """A shared tensor S where it meets the examples, and its explicit broadcast T (the backward asks for T's
    gradient: the per-example cotangent of S)."""

    shared: Tensor  # S: computed from parameters only, the same for every example
    expanded: Tensor  # T = S broadcast to the batch: (B * S.shape[0], ...) or (B, *S.shape), example-major


class SharedTracker(TorchFunctionMode):
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
        self.frames: list[Frame] = []
        self.direct: set[str] = set()  # parameters used outside a call of their own module
        self.tainted: set[str] = set()  # parameters of shared tensors that met the examples uncaptured
        self.captures: list[Capture] = []
        self.active = True  # off once the backward starts (the rules' own ops need no tracking)

    def is_shared(self, t: object) -> bool:
        """Whether ``t`` is a tracked tensor (a parameter, or computed from parameters alone)."""
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

    def _note_uses(self, shared_in: list[Tensor], frame: Frame | None) -> None:
        for t in shared_in:
            name = self.param_name.get(id(t))
            if name is not None and (frame is None or id(t) not in frame.own):
                self.direct.add(name)

    def _capture(self, s: Tensor, padded: tuple[int, ...], repeat: bool) -> Tensor:
        base = s.reshape(padded)
        t = base.repeat(self.B, *([1] * (len(padded) - 1))) if repeat else base.expand(self.B, *padded[1:])
        self.captures.append(Capture(s, t))
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
