"""What ayf's callbacks and tasks need to behave under Lightning's multi-process strategies (DDP,
FSDP): the run folder without a collective call on one rank, work split over ranks and gathered
back in order, and rank-0-only work behind a barrier."""
from __future__ import annotations

import math

import torch


def run_dir(trainer) -> str:
    """The folder of this run's files (``<log_dir>``, else the trainer's default root).

    ``trainer.log_dir`` is a collective call under DDP (rank 0's folder is broadcast), so it must
    not be asked on one rank alone: the folder is resolved once, in :meth:`AyfTask.setup` on every
    rank, and kept on the trainer for the hooks that write on rank 0."""
    cached = getattr(trainer, "_ayf_run_dir", None)
    if cached is None:
        cached = trainer.log_dir or trainer.default_root_dir
        trainer._ayf_run_dir = cached
    return cached


def reset_run_dir(trainer) -> str:
    """Resolves :func:`run_dir` again (on every rank: a new stage may log to a new version folder)."""
    trainer._ayf_run_dir = None
    return run_dir(trainer)


def world(trainer) -> tuple:
    """``(rank, world size)`` of the trainer (``(0, 1)`` without one)."""
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The indices of ``range(n)`` that ``rank`` handles: contiguous chunks of ``ceil(n / world)``."""
    chunk = math.ceil(n / world_size)
    return range(min(n, rank * chunk), min(n, (rank + 1) * chunk))


def gather_in_order(trainer, local: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenates every rank's :func:`shard_range` rows of an ``n``-row result, in rank order.

    ``local`` holds this rank's rows (possibly none); every rank must call this. Single process:
    returns ``local``."""
    rank, size = world(trainer)
    if size == 1:
        return local
    chunk = math.ceil(n / size)
    padded = local.new_zeros((chunk, *local.shape[1:]))
    padded[: len(local)] = local
    gathered = trainer.strategy.all_gather(padded)  # (world, chunk, ...)
    return gathered.reshape(size * chunk, *local.shape[1:])[:n]


def gather_objects(trainer, obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects); every rank must call it.
    One process, or no trainer: ``[obj]``."""
    _, size = world(trainer)
    if size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def barrier(trainer, name: str) -> None:
    """Waits for every rank (after work that only rank 0 did); a no-op in one process."""
    if trainer is not None and trainer.world_size > 1:
        trainer.strategy.barrier(name)
