"""Several processes under ``torchrun``: process group set-up and the reductions of the accumulators.

``torchrun --nproc-per-node K -m fastsel score ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; each process
then scores its shard of the batch plan and the accumulators are combined at the end: sums (Fisher) by
``all_reduce_sum_`` in float64, class statistics by an exact pairwise merge of every rank's
(count, mean, M2) in rank order (:func:`all_merge_class_stats`). gloo on CPU, NCCL on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistEnv", "init_distributed", "shutdown_distributed", "all_reduce_sum_", "all_gather_objects",
           "all_merge_class_stats", "barrier"]


@dataclass
class DistEnv:
    """rank / world_size of this process, its device, and whether it started the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def init_distributed(device: str = "cpu") -> DistEnv:
    """Join the process group described by torchrun's environment (one process: nothing to do).

    The backend is NCCL for CUDA devices, gloo otherwise; rank r uses cuda:LOCAL_RANK when ``device`` is
    "cuda". An already initialised group (tests, launchers) is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
        return DistEnv(rank, world, local, dev, owns_group=False)
    if world <= 1:
        return DistEnv(0, 1, 0, dev, owns_group=False)
    if not dist.is_available():
        raise RuntimeError("fastsel: WORLD_SIZE > 1 but torch.distributed is not available in this build")
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistEnv(rank, world, local, dev, owns_group=True)


def shutdown_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def all_reduce_sum_(tensors: Sequence[Tensor], group: Any = None) -> None:
    """Sum each tensor over the ranks, in place; the reduction runs in float64 (fewer rounding errors)."""
    for t in tensors:
        buf = t.detach().to(torch.float64)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        t.copy_(buf.to(t.dtype))


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_merge_class_stats(
    count: Tensor, mean: Tensor, m2: Tensor, group: Any = None,
    merge: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact merge of per-class statistics over the ranks: every rank gets the same merged result.

    count (C,), mean (C, D), m2 (C, D, D) (sums of centred outer products). The ranks' statistics are
    gathered and merged pairwise in rank order with Chan et al.'s formula (``merge``, default
    :func:`fastsel.pipeline.merge_class_stats`), so no rank's sums are cancelled against large means.
    """
    if merge is None:
        from fastsel.pipeline import merge_class_stats as merge
    world = dist.get_world_size(group)
    parts = []
    for t in (count, mean, m2):
        bufs = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(bufs, t.contiguous(), group=group)
        parts.append(bufs)
    c, m, s = parts[0][0], parts[1][0], parts[2][0]
    for r in range(1, world):
        c, m, s = merge(c, m, s, parts[0][r], parts[1][r], parts[2][r])
    return c, m, s
