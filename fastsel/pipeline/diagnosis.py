"""Why a batch of the streamed pass went non-finite: the one-line :class:`NonFiniteError` naming the batch, the
first layer, parameter or accumulator affected, and a remedy.

Called only once the pass has seen NaN/Inf (its per-batch check is one host sync over the logits and the
consumers' ``finite_flag``); the diagnosis itself may be slow: it reads every parameter and may rerun the batch.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from fastsel.hf.io import logits_of, model_inputs
from fastsel.pipeline.checks import NonFiniteError, first_nonfinite_parameter
from fastsel.pipeline.context import PipelineContext
from fastsel.pipeline.registry import BatchConsumer, autocast_context

__all__ = ["nonfinite_weights", "first_nonfinite_output", "nonfinite_error"]


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


def nonfinite_error(ctx: PipelineContext, consumers: Sequence[BatchConsumer], batch: Mapping[str, Tensor], batch_no: int,
                    rank: int, world: int, autocast: str, logits_ok: bool, saved: int | None) -> NonFiniteError:
    """The NonFiniteError (one line) of batch ``batch_no`` of this rank: what went non-finite (the logits/loss, or
    only the accumulators when ``logits_ok``), the first thing affected (the weights, else, for bad logits, the
    first block output, else the first consumer's ``first_nonfinite()``), the batch's examples, and a remedy;
    ``saved``: the batch of the checkpoint that stays (None: none)."""
    what = "the accumulators" if logits_ok else "the logits/loss"
    where = nonfinite_weights(ctx)
    if where is None and not logits_ok:
        where = first_nonfinite_output(ctx, batch, autocast)
    if where is None:
        for c in consumers:
            where = c.first_nonfinite()
            if where:
                break
    idx = batch["index"].tolist() if "index" in batch else []
    shown = ",".join(map(str, idx[:4])) + (",..." if len(idx) > 4 else "")
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
    return NonFiniteError(f"fastsel: non-finite values (NaN/Inf) in {what} at batch {batch_no}{rank_txt} (examples {shown}); "
                          f"first affected: {where or 'unknown'}; no scores written{kept}; {hint}")
