"""Several processes under ``torchrun``: process group set-up and the reductions of the accumulators.

``torchrun --nproc-per-node K -m fastsel score ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; each process
then scores its shard of the batch schedule and the accumulators are combined at the end: sums (Fisher) by
``all_reduce_sum_`` in float64, class statistics by an exact pairwise merge of every rank's
(count, mean, M2) in rank order (:func:`all_merge_class_stats`). gloo on CPU, NCCL on CUDA.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fastsel.scores.variability import merge_class_stats

__all__ = ["DistEnv", "init_distributed", "shutdown_distributed", "all_reduce_sum_", "broadcast_from_rank0_", "all_gather_objects",
           "all_merge_class_stats", "barrier", "PeerFailure", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 1800.0  # a collective waiting longer than this for another rank fails (torch's default; --dist-timeout)


class PeerFailure(RuntimeError):
    """Another process of the run died, stopped, or did not reach a collective in time."""


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


def world_size() -> int:
    """Processes in this run (torchrun's WORLD_SIZE, or an initialised group's size; 1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    """This process's rank (0 without torchrun): rank 0 alone writes outputs and prints."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: str = "cpu", timeout_s: float | None = None) -> DistEnv:
    """Join the process group described by torchrun's environment (one process: nothing to do).

    The backend is NCCL for CUDA devices, gloo otherwise; rank r uses cuda:LOCAL_RANK when ``device`` is
    "cuda". An already initialised group (tests, launchers) is reused. ``timeout_s`` bounds every collective
    (default DEFAULT_TIMEOUT_S): a rank whose peer died fails with an error instead of hanging.
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
    timeout = datetime.timedelta(seconds=float(timeout_s or DEFAULT_TIMEOUT_S))
    if backend == "nccl":  # NCCL honours the timeout only with async error handling
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, ValueError) as exc:
        raise PeerFailure(f"fastsel: rank {rank}/{world} could not join the process group "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); check MASTER_ADDR/MASTER_PORT "
                          "and that every rank started") from None
    return DistEnv(rank, world, local, dev, owns_group=True)


def shutdown_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group whose peers died may not tear down cleanly; we are leaving anyway
            pass


def _collective(what: str):
    """Turn a failed collective (a peer died, was killed, or timed out) into one PeerFailure line."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except PeerFailure:
                raise
            except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise RuntimeError/DistError subclasses
                rank = dist.get_rank() if dist.is_initialized() else "?"
                world = dist.get_world_size() if dist.is_initialized() else "?"
                detail = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise PeerFailure(f"fastsel: rank {rank}/{world}: {what} failed, another process of the run died, was "
                                  f"stopped or did not answer in time ({detail})") from None
        return inner
    return wrap


@_collective("the barrier")
def barrier(env: DistEnv) -> None:
    if env.active:
        if dist.get_backend() == "gloo":  # names the ranks that did not arrive
            dist.monitored_barrier(wait_all_ranks=True)
        else:
            dist.barrier()


@_collective("the reduction of the accumulators")
def all_reduce_sum_(tensors: Sequence[Tensor], group: Any = None) -> None:
    """Sum each tensor over the ranks, in place; the reduction runs in float64 (fewer rounding errors)."""
    for t in tensors:
        buf = t.detach().to(torch.float64)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        t.copy_(buf.to(t.dtype))


@_collective("sharing rank 0's tensors")
def broadcast_from_rank0_(tensors: Sequence[Tensor], group: Any = None) -> None:
    """Overwrite each tensor with rank 0's, in place (a head fitted on every rank: rank 0's wins, so that floating
    differences between the ranks' fits cannot give them different heads)."""
    with torch.no_grad():
        for t in tensors:
            buf = t.detach().clone()
            dist.broadcast(buf, src=0, group=group)
            t.copy_(buf)


@_collective("gathering the ranks' results")
def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


@_collective("merging the class statistics")
def all_merge_class_stats(
    count: Tensor, mean: Tensor, m2: Tensor, group: Any = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact merge of per-class statistics over the ranks: every rank gets the same merged result.

    count (C,), mean (C, D), m2 (C, D, D) (sums of centred outer products). The ranks' statistics are
    gathered and merged pairwise in rank order with Chan et al.'s formula
    (:func:`fastsel.scores.variability.merge_class_stats`), so no rank's sums are cancelled against large means.
    """
    world = dist.get_world_size(group)
    parts = []
    for t in (count, mean, m2):
        bufs = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(bufs, t.contiguous(), group=group)
        parts.append(bufs)
    c, m, s = parts[0][0], parts[1][0], parts[2][0]
    for r in range(1, world):
        c, m, s = merge_class_stats(c, m, s, parts[0][r], parts[1][r], parts[2][r])
    return c, m, s
