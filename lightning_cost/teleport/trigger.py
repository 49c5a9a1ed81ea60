"""When to teleport: dominated conflict between task gradients and their mean (paper eqs. 3-4)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["ConflictTrigger", "TriggerResult", "conflict_cosines"]


def conflict_cosines(jacobian: Tensor) -> Tensor:
    """``cos(g_i, g_0)`` for every task (eq. 3), with ``g_0`` the mean of the rows of ``jacobian``.

    A task whose gradient (or a mean gradient) is exactly zero has no direction; its cosine is 0.
    """
    if jacobian.ndim != 2 or jacobian.shape[0] < 2:
        raise ValueError(f"jacobian must have shape [K>=2, P], got {tuple(jacobian.shape)}")
    # K dot products and norms in the Jacobian's precision (no float64 copy of K x P), then float64
    j = jacobian if jacobian.dtype in (torch.float32, torch.float64) else jacobian.float()
    g0 = j.mean(dim=0)
    dots = (j @ g0).double()
    norms = j.norm(dim=1).double() * g0.norm().double()
    return torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(dots))


@dataclass(frozen=True)
class TriggerResult:
    fire: bool
    num_conflicting: int
    cosines: Tensor


@dataclass
class ConflictTrigger:
    """The trigger condition.

    ``rule="paper"`` (default): teleport when at least ``ceil(K/2)`` tasks are in dominated
    conflict, ``sum_i 1[cos(g_i, g_0) < 0] >= ceil(K/2)`` (eq. 4).
    ``rule="authors"``: the authors' public code, any single task with ``cos(g_i, g_0) <= 0``.
    """

    rule: Literal["paper", "authors"] = "paper"

    def __post_init__(self) -> None:
        if self.rule not in ("paper", "authors"):
            raise ValueError(f"rule must be 'paper' or 'authors', got {self.rule!r}")

    @staticmethod
    def threshold(k: int) -> int:
        return math.ceil(k / 2)

    def __call__(self, jacobian: Tensor) -> TriggerResult:
        cos = conflict_cosines(jacobian)
        if self.rule == "paper":
            n = int((cos < 0).sum())
            fire = n >= self.threshold(jacobian.shape[0])
        else:
            n = int((cos <= 0).sum())
            fire = n >= 1
        return TriggerResult(fire=fire, num_conflicting=n, cosines=cos)
