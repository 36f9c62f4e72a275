"""Several processes for one evaluation: shard the work under ``torchrun``, sum the counts.

Launched by ``torchrun --nproc_per_node N ...`` (which sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``), :func:`init_distributed` joins the process group (gloo on CPU, nccl on
GPU). Each rank takes every ``world_size``-th batch of the evaluation (:func:`shard`) and the
correct-prediction counts are summed over ranks with :func:`all_reduce_sum`. Because the
batches, and the seed each batch is attacked with, do not depend on the number of processes,
the counts equal those of a single process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "shard", "all_reduce_sum", "rank_device",
           "is_main_process", "shutdown", "current", "distributed", "batch_slice",
           "broadcast_buffers", "barrier"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (1 = no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def rank_device(device: str | torch.device, info: DistInfo) -> torch.device:
    """``device`` with the CUDA index of this rank's ``LOCAL_RANK`` when it is a bare "cuda"."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def init_distributed(device: str | torch.device = "cpu") -> DistInfo:
    """Join the process group that ``torchrun`` describes, or report a single process.

    Uses an already initialized group as is. Otherwise, when ``WORLD_SIZE`` > 1, initializes
    one with the ``env://`` rendezvous: ``nccl`` for CUDA devices, ``gloo`` otherwise.

    Args:
        device: the evaluation device; decides the backend.

    Returns:
        This process's :class:`DistInfo`.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0),
                        dist.get_backend())
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = _env_int("LOCAL_RANK", 0)
    is_cuda = torch.device(device).type == "cuda"
    backend = "nccl" if is_cuda else "gloo"
    if is_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    log.info("joined process group: rank %d of %d (%s)", info.rank, info.world_size, backend)
    return info


def is_main_process() -> bool:
    """True unless this is a non-zero rank of an initialized process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """This rank's share: items ``rank, rank + world_size, ...`` (round robin)."""
    return list(items[info.rank :: info.world_size])


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo, device: str | torch.device = "cpu"
                   ) -> torch.Tensor:
    """Sum ``tensor`` over all ranks (returns it unchanged for a single process).

    The reduction runs on ``device`` (CUDA for nccl) and the result comes back on the
    tensor's original device.
    """
    if not info.enabled:
        return tensor
    work = tensor.to(rank_device(device, info) if info.backend == "nccl" else "cpu").clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def shutdown() -> None:
    """Leave the process group, if one is initialized (end of a ``torchrun`` command).

    No barrier: after the counts are summed no collective remains, and a rank that failed
    must not leave the others waiting.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> DistInfo:
    """This process's place in the process group the caller joined (world size 1 if none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0),
                        dist.get_backend())
    return DistInfo()


@contextlib.contextmanager
def distributed(device: str | torch.device = "cpu") -> Iterator[DistInfo]:
    """Join the ``torchrun`` process group for the block, and leave it afterwards.

    The caller owns the process group: the CLI wraps a command in this, a Python script under
    ``torchrun`` does the same around :func:`symensemble.evaluate`, which only reads
    :func:`current`. A group that was already initialized is used and left in place.

        >>> with distributed("cpu") as info:
        ...     result = se.evaluate("paper_cnn")
    """
    owned = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        yield info
    finally:
        if owned:
            shutdown()


# ---- data-parallel training (``symensemble train`` under torchrun) -----------------------------


def batch_slice(n: int, info: DistInfo) -> slice:
    """This rank's contiguous block of a global batch of ``n`` items.

    Rank r takes items ``[⌈r·n/W⌉, ⌈(r+1)·n/W⌉)``: the blocks tile the batch in order, their
    sizes differ by at most one, and the larger ones come first. A block is empty only when
    ``n < W`` (a last batch smaller than the number of processes), and never rank 0's.
    """
    if n < 0:
        raise ValueError(f"batch size must be >= 0, got {n}")
    return slice(-(-info.rank * n // info.world_size), -(-(info.rank + 1) * n // info.world_size))


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics...) to every rank, in place.

    Under DDP each rank's last forward updates its running statistics with its own shard;
    rank 0's are the ones written to the checkpoint, so every rank evaluates with those.
    """
    if not info.enabled:
        return
    for buf in module.buffers():
        if info.backend == "nccl" or buf.device.type == "cpu":
            dist.broadcast(buf, src=0)
        else:  # gloo cannot broadcast CUDA tensors: go through a CPU copy
            work = buf.cpu()
            dist.broadcast(work, src=0)
            buf.copy_(work)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for a single process)."""
    if info.enabled:
        dist.barrier()
