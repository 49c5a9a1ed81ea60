"""Tiny collective helpers: no-ops in a single process, ``torch.distributed`` under DDP."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_mean", "all_reduce_mean_", "broadcast_", "is_distributed", "rank", "warn_rank_zero", "world_size"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's global rank (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def warn_rank_zero(logger: logging.Logger, msg: str, *args: Any) -> None:
    """Log a warning once per job: on global rank 0 at WARNING, on the other ranks at DEBUG.

    Every rank of a DDP job takes the same decisions (they read the same averaged Jacobian), so a
    warning about one (a skipped step, a fallback) would otherwise be printed once per rank.
    """
    if rank() == 0:
        logger.warning(msg, *args)
    else:
        logger.debug(msg, *args)


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean over ranks (a new tensor; the input is left untouched)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(dist.get_world_size())


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """In-place mean over ranks."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """In-place broadcast from ``src``."""
    if is_distributed():
        with torch.no_grad():
            dist.broadcast(tensor, src=src)
    return tensor
