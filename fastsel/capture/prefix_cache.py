"""The cached frozen prefix of a model: the outputs of its bottom blocks computed once, so that training (or
fitting a head) runs only what lies above them; and the reproducible batch orders of those loops."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from fastsel.data.features import PadCollator
from fastsel.hf.io import eval_mode, model_inputs
from fastsel.hf.layer_map import LayerMap
from fastsel.utils.progress import progress_bar

__all__ = ["PrefixCache", "index_batches"]


def index_batches(n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int = 0) -> list[list[int]]:
    """Example indices per batch; shuffled by a generator keyed by (seed, epoch) so runs are reproducible."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    else:
        order = list(range(n))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


class _StopForward(Exception):
    pass


class _CachedInput(nn.Module):
    """Stands in for the embeddings: returns the cached prefix output of the current batch."""

    def __init__(self) -> None:
        super().__init__()
        self.value: Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        assert self.value is not None, "no cached batch set"
        return self.value


class _PassThrough(nn.Module):
    """Stands in for a cached block: returns its hidden-state input (as a 1-tuple when blocks return tuples)."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any):
        if isinstance(hidden_states, tuple):  # some architectures pass x as a tuple
            hidden_states = hidden_states[0]
        return (hidden_states,) if self.as_tuple else hidden_states


class PrefixCache:
    """Outputs (T_i, H) of block c-1 (c = ``num_blocks``) for a fixed list of features, computed once.

    ``activate(model)`` swaps the embeddings for a cache reader and blocks 0..c-1 for pass-throughs;
    ``set_batch(indices)`` loads the padded (B, T, H) cache of those examples.
    """

    def __init__(self, model: nn.Module, layer_map: LayerMap, num_blocks: int, features: Sequence[dict],
                 collator: PadCollator, batch_size: int = 64, device: str | torch.device = "cpu",
                 progress: bool = False, desc: str = "cache") -> None:
        if not 1 <= num_blocks <= layer_map.num_layers:
            raise ValueError(f"fastsel: cannot cache {num_blocks} blocks of {layer_map.num_layers}")
        self.layer_map, self.num_blocks, self.collator = layer_map, num_blocks, collator
        self.device = torch.device(device)
        self.left = collator.left
        self.states: list[Tensor] = []
        self.as_tuple = False
        start = time.perf_counter()
        block = layer_map.blocks(model)[num_blocks - 1]
        captured: list[Any] = []

        def hook(_m, _inp, out):
            captured.append(out)
            raise _StopForward  # nothing above the cached block is needed

        handle = block.register_forward_hook(hook)
        try:
            with eval_mode(model), torch.no_grad(), progress_bar(len(features), desc, disable=not progress) as bar:
                for idx in index_batches(len(features), batch_size, shuffle=False, seed=0):
                    batch = collator([features[i] for i in idx])
                    inputs = {k: v.to(self.device) for k, v in model_inputs(batch).items()}
                    captured.clear()
                    with contextlib.suppress(_StopForward):
                        model(**inputs)
                    out = captured[0]
                    self.as_tuple = isinstance(out, tuple)
                    h = (out[0] if self.as_tuple else out).detach()
                    for row, i in enumerate(idx):
                        n = len(features[i]["input_ids"])
                        self.states.append((h[row, -n:] if self.left else h[row, :n]).clone())
                    bar.update(len(idx))
        finally:
            handle.remove()
        self.seconds = time.perf_counter() - start
        self._reader = _CachedInput()

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)

    def set_batch(self, indices: Sequence[int]) -> None:
        states = [self.states[i] for i in indices]
        width = max(s.shape[0] for s in states)
        out = states[0].new_zeros(len(states), width, states[0].shape[1])
        for row, s in enumerate(states):
            if self.left:
                out[row, width - s.shape[0] :] = s
            else:
                out[row, : s.shape[0]] = s
        self._reader.value = out

    @contextlib.contextmanager
    def activate(self, model: nn.Module) -> Iterator[None]:
        """Within the block, ``model(...)`` runs blocks c.. on the cached batch (set by ``set_batch``)."""
        blocks = self.layer_map.blocks(model)
        saved_blocks = [blocks[l] for l in range(self.num_blocks)]
        emb_name = self.layer_map.embeddings_name
        saved_emb = model.get_submodule(emb_name)
        try:
            model.set_submodule(emb_name, self._reader)
            for l in range(self.num_blocks):
                blocks[l] = _PassThrough(self.as_tuple)
            yield
        finally:
            model.set_submodule(emb_name, saved_emb)
            for l, b in enumerate(saved_blocks):
                blocks[l] = b
            self._reader.value = None
