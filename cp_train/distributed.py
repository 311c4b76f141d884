"""Data-parallel training under ``torchrun``: process group, rank sharding, rank-0-only side effects.

Every helper is a no-op in a plain single process, so one code path serves both. ``cp-train``
trains on the CPU, hence the gloo backend (it also runs across nodes over TCP).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1).
    Returns whether this call created it (the caller then calls :func:`shutdown`)."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("gloo")
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, logs, bundles and prints."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def mean_across_ranks(value: float) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def rank_share(batch: np.ndarray) -> np.ndarray | None:
    """This rank's part of one global batch: consecutive, near-equal slices in rank order, so
    N ranks with batch B see exactly what one process with batch N*B sees. ``None`` when the
    batch is too small to give every rank an item: all ranks then skip it together, because a
    rank without a backward pass would leave the others waiting in DDP's all-reduce."""
    n = world_size()
    if len(batch) < n:
        return None
    return np.array_split(batch, n)[rank()]


def wrap(model: nn.Module) -> nn.Module:
    """``model`` under DistributedDataParallel when there are several ranks (it broadcasts rank
    0's weights, so every rank starts equal), else ``model`` itself."""
    if world_size() == 1:
        return model
    # The SAM heads leave some prompt-encoder parameters unused in each stage (box prompts
    # never touch the point embeddings); DDP must not wait for their gradients.
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)


def shard(items: Sequence, r: int | None = None) -> list[int]:
    """Indices of ``items`` that rank ``r`` (default: this rank) handles: every world_size-th."""
    r = rank() if r is None else r
    return list(range(r, len(items), world_size()))
