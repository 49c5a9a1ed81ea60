"""Tiny collective helpers: no-ops in a single process, ``torch.distributed`` under DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_mean", "broadcast_", "is_distributed", "world_size"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


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
