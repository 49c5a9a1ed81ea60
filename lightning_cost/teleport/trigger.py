"""When to teleport: dominated conflict between task gradients and their mean (paper eqs. 3-4)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_cost.aggregators.base import GRAMIAN_BLOCK

__all__ = ["ConflictTrigger", "TriggerResult", "conflict_cosines", "conflict_cosines_from_gram", "representation_gram"]


def conflict_cosines(jacobian: Tensor) -> Tensor:
    """``cos(g_i, g_0)`` for every task (eq. 3), with ``g_0`` the mean of the rows of ``jacobian``.

    A task whose gradient (or a mean gradient) is exactly zero has no direction; its cosine is 0.
    """
    if jacobian.ndim != 2 or jacobian.shape[0] < 2:
        raise ValueError(f"jacobian must have shape [K>=2, P], got {tuple(jacobian.shape)}")
    # K dot products and squared norms in the Jacobian's precision (no float64 copy of K x P), summed
    # per block of GRAMIAN_BLOCK columns and the blocks in float64: one long float32 sum over P lost
    # 4e-4 (norms) and 2e-5 (dots) relative at P = 11M on this project's CPU; blocked, ~4e-7.
    j = jacobian if jacobian.dtype in (torch.float32, torch.float64) else jacobian.float()
    g0 = j.mean(dim=0)
    dots = torch.zeros(j.shape[0], dtype=torch.float64, device=j.device)
    sq = torch.zeros_like(dots)
    g0_sq = torch.zeros((), dtype=torch.float64, device=j.device)
    for start in range(0, j.shape[1], GRAMIAN_BLOCK):
        x, v = j[:, start : start + GRAMIAN_BLOCK], g0[start : start + GRAMIAN_BLOCK]
        dots += (x @ v).double()
        sq += (x * x).sum(dim=1).double()
        g0_sq += (v @ v).double()
    norms = sq.sqrt() * g0_sq.sqrt()
    return torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(dots))


def conflict_cosines_from_gram(gram: Tensor) -> Tensor:
    """``cos(g_i, g_0)`` (eq. 3) from the ``K x K`` Gram matrix ``G = J J^T`` of the task gradients.

    ``J g_0 = G 1 / K`` and ``||g_0||^2 = 1^T G 1 / K^2``, so the cosines need only ``G``: this is how
    the representation trigger decides without ever forming a parameter Jacobian. Zero norms give 0.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 2:
        raise ValueError(f"gram must have shape [K>=2, K], got {tuple(gram.shape)}")
    g = gram.double()
    k = g.shape[0]
    dots = g.sum(dim=1) / k
    g0_sq = g.sum().clamp_min(0.0) / (k * k)
    norms = g.diagonal().clamp_min(0.0).sqrt() * g0_sq.sqrt()
    return torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(dots))


def representation_gram(rep_jacobian: Tensor, reduce: Literal["flatten", "mean"] = "flatten") -> Tensor:
    """``K x K`` Gram matrix of per-task gradients w.r.t. the shared representation.

    ``rep_jacobian`` is ``[K, B, D]`` (``StepRecord.representation_jacobian``: sample ``b``'s
    gradient ``dL_i/dz_b``). ``reduce="flatten"``: the gradients as ``B*D`` vectors,
    ``G_ij = sum_b <dL_i/dz_b, dL_j/dz_b>``; ``reduce="mean"``: summed over the batch first (the
    gradient w.r.t. a shift of every ``z_b``), ``G_ij = <sum_b dL_i/dz_b, sum_b dL_j/dz_b>``. Local:
    under DDP reduce the Gram (``flatten``) or the ``[K, D]`` sums (``mean``) over ranks.
    """
    if rep_jacobian.ndim != 3:
        raise ValueError(f"rep_jacobian must have shape [K, B, D], got {tuple(rep_jacobian.shape)}")
    if reduce == "flatten":
        v = rep_jacobian.reshape(rep_jacobian.shape[0], -1)
    elif reduce == "mean":
        v = rep_jacobian.sum(dim=1)
    else:
        raise ValueError(f"reduce must be 'flatten' or 'mean', got {reduce!r}")
    v = v.float()
    return (v @ v.T).double()


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

    def __call__(self, jacobian: Tensor, gramian: Tensor | None = None) -> TriggerResult:
        """Decide from the ``K x P`` Jacobian, or from ``gramian`` (``J J^T``) when it is given.

        With a Gramian aggregator the multi-task core has ``J J^T`` already (``mtl_step.gramian``) and
        the callback passes it here, so the cosines cost ``K x K`` work instead of a pass over ``J``.
        """
        if gramian is not None:
            return self.from_gram(gramian)
        return self.decide(conflict_cosines(jacobian))

    def from_gram(self, gram: Tensor) -> TriggerResult:
        """The same decision from the ``K x K`` Gram matrix of the task gradients."""
        return self.decide(conflict_cosines_from_gram(gram))

    def decide(self, cos: Tensor) -> TriggerResult:
        """The rule applied to the ``K`` cosines ``cos(g_i, g_0)``."""
        if self.rule == "paper":
            n = int((cos < 0).sum())
            fire = n >= self.threshold(cos.shape[0])
        else:
            n = int((cos <= 0).sum())
            fire = n >= 1
        return TriggerResult(fire=fire, num_conflicting=n, cosines=cos)
