"""Houlsby bottleneck adapters (Houlsby et al. 2019), inserted after a block's attention and FFN outputs.

peft has no Houlsby adapter, so this is a small module plus a wrapper: :class:`AdaptedLinear` wraps the
block's output projection (BERT: ``attention.output.dense`` and ``output.dense``) so that its output
``y`` (B, T, H) becomes ``y + up(act(down(y)))`` before the block's residual connection and LayerNorm,
as in Houlsby et al.'s Figure 2. With the BERT initialisation (normal, std 0.02, zero biases; Xie et al.
B.2) the adapter starts close to the identity.
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["BottleneckAdapter", "AdaptedLinear", "insert_adapter"]


class BottleneckAdapter(nn.Module):
    """x (..., H) -> x + up(gelu(down(x))), down: H -> size, up: size -> H."""

    def __init__(self, hidden_size: int, size: int, *, init_std: float = 0.02, device=None, dtype=None) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"fastsel: adapter size must be >= 1, got {size}")
        self.down = nn.Linear(hidden_size, size, device=device, dtype=dtype)
        self.up = nn.Linear(size, hidden_size, device=device, dtype=dtype)
        self.act = nn.GELU()
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, std=init_std)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.act(self.down(x)))


class AdaptedLinear(nn.Module):
    """A linear layer followed by an adapter: x (..., in) -> adapter(base(x)) (..., out)."""

    def __init__(self, base: nn.Linear, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    @property
    def weight(self) -> Tensor:  # some model code reads .weight of the projection (dtype checks)
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(self.base(x))


def insert_adapter(block: nn.Module, path: str, size: int, init_std: float = 0.02) -> AdaptedLinear:
    """Replace the linear at ``block.<path>`` by an AdaptedLinear with a fresh adapter; returns it."""
    base = block.get_submodule(path)
    if isinstance(base, AdaptedLinear):
        raise ValueError(f"fastsel: {path} already has an adapter")
    if not isinstance(base, nn.Linear):
        raise ValueError(f"fastsel: cannot put an adapter after {path}: it is a {type(base).__name__}, not a Linear")
    adapter = BottleneckAdapter(base.out_features, size, init_std=init_std, device=base.weight.device,
                                dtype=base.weight.dtype if base.weight.is_floating_point() else None)
    wrapped = AdaptedLinear(base, adapter)
    block.set_submodule(path, wrapped)
    return wrapped
