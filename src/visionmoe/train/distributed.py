"""Data-parallel training with PyTorch's own engine: ``torchrun`` sets ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK``; :func:`init_distributed` joins the process group (NCCL on
GPUs, gloo on CPUs) and the :class:`~visionmoe.train.Trainer` averages the gradients over the
ranks (DistributedDataParallel's arithmetic, expert shards aware: see
:mod:`visionmoe.moe.parallel`), gives each rank ``1/world`` of every global batch, reduces
metrics and routing statistics across ranks and writes logs and checkpoints on rank 0 only.
Checkpoints hold full tensors (experts as ``(E, D, H)``), so they load on any number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "launch_ranks", "init_distributed", "all_reduce_sums", "barrier"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def launch_ranks() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` as the launcher (``torchrun``) gives them: the one place
    the library reads the environment, because torch.distributed's ``env://`` rendezvous is
    defined by these variables; ``(0, 1, 0)`` in a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return (int(os.environ["RANK"]) if world > 1 else 0), world, local


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes (once); a plain process gets rank 0 of 1.
    ``backend``: ``nccl`` for CUDA runs, ``gloo`` for CPU ones (default: by CUDA's presence)."""
    rank, world, local = launch_ranks()
    if world <= 1:
        return DistInfo()
    if not dist.is_available():  # pragma: no cover
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl" and not torch.cuda.is_initialized():
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=dist.get_world_size(), local_rank=local)


def all_reduce_sums(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Sum every value of ``values`` over the ranks (keys must agree across ranks)."""
    if not info.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.cpu().tolist()))


def collective_device() -> torch.device:
    """Where tensors for collectives live: the current CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
