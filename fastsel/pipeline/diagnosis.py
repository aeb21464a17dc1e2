"""Finite checks of the streamed pass, and why a batch went non-finite: the one-line :class:`NonFiniteError`
naming the batch, the first layer, parameter or accumulator affected, and a remedy.

:class:`FiniteChecks` checks every N batches (``--finite-check-every``), not every batch: one host sync over the
logits flags of the batches since the last check and the consumers' ``finite_flag`` (which reads every
accumulator). A failed check finds the batch afterwards: the first batch with non-finite logits, else the batches
since the last check replayed one by one into zeroed accumulators (the run is failing; the checkpoint on disk was
saved after a passed check). The diagnosis itself may be slow: it reads every parameter and reruns batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from fastsel.data.corpus import batch_to_device
from fastsel.hf.io import logits_of, model_inputs
from fastsel.pipeline.checks import NonFiniteError, first_nonfinite_parameter
from fastsel.pipeline.context import PipelineContext
from fastsel.pipeline.registry import BatchConsumer, Step, autocast_context

__all__ = ["nonfinite_weights", "first_nonfinite_output", "nonfinite_error", "FiniteChecks"]


def nonfinite_weights(ctx: PipelineContext) -> str | None:
    """The first parameter holding NaN/Inf, described for a message ("parameter P (block 3) holds NaN in the
    model's weights"), or None."""
    name = first_nonfinite_parameter(ctx.model)
    if name is None:
        return None
    p = dict(ctx.model.named_parameters())[name]
    kind = "NaN" if bool(torch.isnan(p).any()) else "Inf"
    return f"parameter {name} ({ctx.layer_map.describe(name)}) holds {kind} in the model's weights"


def first_nonfinite_output(ctx: PipelineContext, batch: Mapping[str, Tensor], autocast: str) -> str | None:
    """Re-run the batch's forward (no grad, the pass's autocast) with hooks on the embeddings and every block: the
    first output holding NaN/Inf ("the output of block 2", ..., "the output of the head (logits)"), or None."""
    lm = ctx.layer_map
    named = dict(ctx.model.named_modules())
    modules = [("embeddings", lm.embeddings_name)] + [(f"block {l}", lm.block_name(l)) for l in range(lm.num_layers)]
    found: list[str] = []
    handles = []

    def hook(where: str):
        def fn(_m, _i, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if not found and isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                found.append(f"the output of {where}")
        return fn

    try:
        for where, name in modules:
            if name in named:
                handles.append(named[name].register_forward_hook(hook(where)))
        with torch.no_grad(), autocast_context(ctx.device, autocast):
            out = ctx.model(**model_inputs(batch))
        if not found and not bool(torch.isfinite(logits_of(out)).all()):
            found.append("the output of the head (logits)")
    except Exception:  # noqa: BLE001 - diagnosis only
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def nonfinite_error(ctx: PipelineContext, consumers: Sequence[BatchConsumer], batch: Mapping[str, Tensor] | None,
                    batch_no: int, rank: int, world: int, autocast: str, logits_ok: bool, saved: int | None,
                    last_batch: int | None = None) -> NonFiniteError:
    """The NonFiniteError (one line) of batch ``batch_no`` of this rank: what went non-finite (the logits/loss, or
    only the accumulators when ``logits_ok``), the first thing affected (the weights, else, for bad logits, the
    first block output, else the first consumer's ``first_nonfinite()``), the batch's examples, and a remedy;
    ``saved``: the batch of the checkpoint that stays (None: none). ``last_batch`` (batch None): the batch was not
    found, only that it is one of ``batch_no``..``last_batch``."""
    what = "the accumulators" if logits_ok else "the logits/loss"
    where = nonfinite_weights(ctx)
    if where is None and not logits_ok and batch is not None:
        where = first_nonfinite_output(ctx, batch, autocast)
    if where is None:
        for c in consumers:
            where = c.first_nonfinite()
            if where:
                break
    if batch is None:
        at = f"one of batches {batch_no}-{last_batch}"
    else:
        idx = batch["index"].tolist() if "index" in batch else []
        at = f"batch {batch_no}" + (f" (examples {','.join(map(str, idx[:4]))}{',...' if len(idx) > 4 else ''})"
                                    if idx else "")
    rank_txt = f" of rank {rank}/{world}" if world > 1 else ""
    if where and "weights" in where:
        hint = "the model's weights are broken: reload or re-download the checkpoint (fp32 cannot fix them)"
    elif autocast == "fp16":
        hint = "try --autocast bf16 (fp16 overflows easily), or fp32 (--autocast none)"
    elif autocast == "bf16":
        hint = "try fp32 (--autocast none)"
    else:
        hint = "try fp32 (--autocast none) and check the model's weights and the inputs"
    kept = f"; the checkpoint of batch {saved} is kept" if saved is not None else ""
    return NonFiniteError(f"fastsel: non-finite values (NaN/Inf) in {what} at {at}{rank_txt}; "
                          f"first affected: {where or 'unknown'}; no scores written{kept}; {hint}")


@dataclass
class FiniteChecks:
    """The streamed pass's checks for NaN/Inf (see the module docstring): ``add`` after each batch, ``check`` when
    ``due`` and before each checkpoint, stability check and the end of the pass.

    ``step`` reruns a batch (the eager step; replays happen only once a check failed); ``pending`` holds (batch
    number, the batch as read, on the host; its logits flag) of every batch since the last passed check.
    """

    ctx: PipelineContext
    consumers: list[BatchConsumer]
    step: Step
    every: int
    rank: int = 0
    world: int = 1
    pending: list[tuple[int, dict[str, Tensor], Tensor]] = field(default_factory=list)
    checks: int = 0

    @property
    def due(self) -> bool:
        return len(self.pending) >= self.every

    def add(self, batch_no: int, host_batch: dict[str, Tensor], logits_ok: Tensor) -> None:
        # a copy of the flag: a CUDA graph's outputs are overwritten by its next replay
        self.pending.append((batch_no, host_batch, logits_ok.detach().clone()))

    def _flags(self) -> list[Tensor]:
        return [f.reshape(1) for f in (c.finite_flag() for c in self.consumers) if f is not None]

    def check(self, saved: int | None) -> None:
        """Raise the :class:`NonFiniteError` of the first non-finite batch since the last check (one host sync when
        all is finite); ``saved``: the batch of the checkpoint that stays."""
        if not self.pending:
            return
        self.checks += 1
        logits = torch.stack([f for _, _, f in self.pending])
        if bool(torch.cat([logits, *self._flags()]).all()):
            self.pending.clear()
            return
        autocast, pending = self.ctx.pipeline.autocast, list(self.pending)
        bad = (~logits).nonzero()
        if bad.numel():
            batch_no, host, _ = pending[int(bad[0])]
            raise nonfinite_error(self.ctx, self.consumers, batch_to_device(host, self.ctx.device), batch_no, self.rank,
                                  self.world, autocast, False, saved)
        found = self._replay(pending)
        if found is None:
            raise nonfinite_error(self.ctx, self.consumers, None, pending[0][0], self.rank, self.world, autocast, True,
                                  saved, last_batch=pending[-1][0])
        batch_no, batch, logits_ok = found
        raise nonfinite_error(self.ctx, self.consumers, batch, batch_no, self.rank, self.world, autocast, logits_ok,
                              saved)

    def _replay(self, pending: list[tuple[int, dict[str, Tensor], Tensor]]) -> tuple[int, dict[str, Tensor], bool] | None:
        """Zero the accumulators, rerun the pending batches in order: the first after which a flag is False
        (batch number, batch on the device, its logits finite), or None (not reproduced, or a consumer cannot zero)."""
        try:
            for c in self.consumers:
                c.zero_()
        except NotImplementedError:
            return None
        ctx = self.ctx
        for batch_no, host, _ in pending:
            batch = batch_to_device(host, ctx.device)
            logits_ok = self.step(ctx.model, self.consumers, batch, ctx.pipeline.autocast, ctx.device)
            if not bool(torch.cat([logits_ok.reshape(1), *self._flags()]).all()):
                return batch_no, batch, bool(logits_ok)
        return None
