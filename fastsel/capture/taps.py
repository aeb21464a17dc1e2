"""Hidden-state taps: every layer's states as a forward produces them, and the pooled state of each example.

``layer_taps`` hooks the embeddings' output and every block (index 0 = embeddings, l + 1 = block l, as HF's
``hidden_states``); ``pool_mask`` says which tokens make an example's state; ``masked_mean`` pools them.
Nothing here knows a metric.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from fastsel.hf.layer_map import LayerMap

__all__ = ["POOLINGS", "pool_mask", "masked_mean", "layer_taps", "PooledStates"]

POOLINGS = ("mean", "cls")


def pool_mask(batch: Mapping[str, Tensor], pooling: str = "mean") -> Tensor:
    """(B, T) bool mask of the tokens whose states are averaged into each example's state.

    ``mean``: attended and not special (needs ``special_tokens_mask`` from the tokenizer, as given by
    fastsel.data; never guessed from token ids). ``cls``: the first attended token (CLS / <s>), on either
    padding side.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"fastsel: unknown pooling {pooling!r}; choose from {POOLINGS}")
    attention = batch["attention_mask"].bool()
    if pooling == "mean":
        if "special_tokens_mask" not in batch:
            raise ValueError("fastsel: mean pooling needs the batch's special_tokens_mask (tokenize with fastsel.data)")
        return attention & ~batch["special_tokens_mask"].bool()
    first = attention.long().argmax(1)  # first attended position
    mask = torch.zeros_like(attention)
    mask[torch.arange(mask.shape[0], device=mask.device), first] = True
    return mask & attention


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in ("hidden_states", "hidden_state", "x"):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    raise RuntimeError("fastsel: could not find the hidden states entering block 0")


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, D) mean of hidden (B, T, D) over the positions where mask (B, T) is set; 0 for an example without any."""
    w = mask.to(hidden.dtype)
    return torch.bmm(w.unsqueeze(1), hidden).squeeze(1) / w.sum(1, keepdim=True).clamp(min=1)


@contextlib.contextmanager
def layer_taps(model: nn.Module, layer_map: LayerMap, consume: Callable[[int, Tensor], None]) -> Iterator[None]:
    """Call ``consume(index, hidden (B, T, D))`` as each layer's states are produced during a forward.

    index 0 is the embedding output (the input of block 0, i.e. ``hidden_states[0]`` of HF models),
    index l + 1 the output of block l, as HF's ``hidden_states[l + 1]``: for the last block of a pre-LN
    backbone with a final norm (Llama, Qwen2, ModernBERT) that is the norm's output. Hooks are removed on exit.
    """
    blocks = layer_map.blocks(model)
    handles = [
        blocks[0].register_forward_pre_hook(lambda _m, args, kwargs: consume(0, _first_tensor(args, kwargs)), with_kwargs=True)
    ]
    outputs = list(blocks)
    if layer_map.final_norm_name:
        outputs[-1] = model.get_submodule(layer_map.final_norm_name)
    for l, module in enumerate(outputs):
        def hook(_m, _args, out, l=l):
            consume(l + 1, out[0] if isinstance(out, (tuple, list)) else out)

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class PooledStates:
    """``on_layer`` callback keeping every layer's pooled states (N, D) and the labels: for the small
    probe / CCA sets only, never for the streaming statistics. Examples without pooled tokens dropped."""

    def __init__(self) -> None:
        self.states: dict[int, list[np.ndarray]] = {}
        self.labels: list[np.ndarray] = []

    def __call__(self, index: int, hidden: Tensor, mask: Tensor, labels: Tensor | None) -> None:
        keep = mask.any(1)
        pooled = masked_mean(hidden.detach().to(torch.float64), mask)
        self.states.setdefault(index, []).append(pooled[keep].cpu().numpy())
        if index == 0 and labels is not None:
            self.labels.append(labels[keep].cpu().numpy())

    def result(self) -> tuple[list[np.ndarray], np.ndarray]:
        if not self.states:
            raise ValueError("fastsel: no examples (empty data)")
        return [np.concatenate(self.states[i]) for i in sorted(self.states)], (np.concatenate(self.labels) if self.labels else np.zeros(0))
