"""When to teleport: dominated conflict between task gradients and their mean (paper eqs. 3-4)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_cost.aggregators.base import GRAMIAN_BLOCK
from lightning_cost.distributed import all_reduce_mean
from lightning_cost.protocol import StepRecord

__all__ = [
    "ConflictTrigger",
    "TriggerResult",
    "conflict_cosines",
    "conflict_cosines_from_gram",
    "representation_gram",
]

RULES = ("majority", "any")
SOURCES = ("parameters", "representation")
REDUCTIONS = ("flatten", "mean")


def _cosines(dots: Tensor, sq: Tensor, g0_sq: Tensor) -> Tensor:
    """``dots / sqrt(sq * g0_sq)``: NaN where a task's gradient is zero, 0 where only the mean is."""
    norms = sq.clamp_min(0.0).sqrt() * g0_sq.clamp_min(0.0).sqrt()
    cos = torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(dots))
    return torch.where(sq > 0, cos, torch.full_like(cos, float("nan")))


def conflict_cosines(jacobian: Tensor) -> Tensor:
    """``cos(g_i, g_0)`` for every task (eq. 3), with ``g_0`` the mean of the rows of ``jacobian``.

    A task whose gradient is exactly zero (no labels of it in the batch, say) has no direction: its
    cosine is NaN. Tasks that cancel exactly (``g_0 = 0``) get 0. Sums run per block of
    ``GRAMIAN_BLOCK`` columns, the blocks added in float64, so the cosines keep float32 accuracy at
    any ``P`` without a float64 copy of ``J``.
    """
    if jacobian.ndim != 2 or jacobian.shape[0] < 2:
        raise ValueError(f"jacobian must have shape [K>=2, P], got {tuple(jacobian.shape)}")
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
    return _cosines(dots, sq, g0_sq)


def conflict_cosines_from_gram(gram: Tensor) -> Tensor:
    """``cos(g_i, g_0)`` (eq. 3) from the ``K x K`` Gram matrix ``G = J J^T`` of the task gradients.

    ``J g_0 = G 1 / K`` and ``||g_0||^2 = 1^T G 1 / K^2``, so the cosines need only ``G``. Zero
    gradients give NaN, as in :func:`conflict_cosines`.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 2:
        raise ValueError(f"gram must have shape [K>=2, K], got {tuple(gram.shape)}")
    g = gram.double()
    k = g.shape[0]
    return _cosines(g.sum(dim=1) / k, g.diagonal(), g.sum() / (k * k))


def representation_gram(rep_jacobian: Tensor, reduce: Literal["flatten", "mean"] = "flatten") -> Tensor:
    """``K x K`` Gram matrix of per-task gradients w.r.t. the shared representation (local to the rank).

    ``rep_jacobian`` is ``[K, B, D]`` (``StepRecord.representation_jacobian``: sample ``b``'s
    gradient ``dL_i/dz_b``). ``reduce="flatten"``: the gradients as ``B*D`` vectors,
    ``G_ij = sum_b <dL_i/dz_b, dL_j/dz_b>``; ``reduce="mean"``: summed over the batch first (the
    gradient w.r.t. a shift of every ``z_b``), ``G_ij = <sum_b dL_i/dz_b, sum_b dL_j/dz_b>``.
    """
    if rep_jacobian.ndim != 3:
        raise ValueError(f"rep_jacobian must have shape [K, B, D], got {tuple(rep_jacobian.shape)}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    v = rep_jacobian.reshape(rep_jacobian.shape[0], -1) if reduce == "flatten" else rep_jacobian.sum(dim=1)
    v = v.float()
    return (v @ v.T).double()


def global_representation_gram(rep_jacobian: Tensor, reduce: Literal["flatten", "mean"] = "flatten") -> Tensor:
    """:func:`representation_gram` over all DDP ranks' samples (identical on every rank).

    Rows of ``rep_jacobian`` are the rank's own samples, so the ranks reduce a statistic of them:
    the Gram itself (``flatten``) or the ``[K, D]`` batch sums (``mean``).
    """
    if reduce == "mean":
        v = all_reduce_mean(rep_jacobian.sum(dim=1).float())
        return (v @ v.T).double()
    return all_reduce_mean(representation_gram(rep_jacobian, "flatten"))


@dataclass(frozen=True)
class TriggerResult:
    fire: bool
    num_conflicting: int
    cosines: Tensor


@dataclass
class ConflictTrigger:
    """The trigger condition on the step's per-task gradients.

    Args:
        rule: ``"majority"`` (the paper's eq. 4): teleport when at least ``ceil(K/2)`` tasks are in
            dominated conflict, ``cos(g_i, g_0) < 0``. ``"any"`` (the authors' public code): when a
            single task has ``cos(g_i, g_0) <= 0``. A task with a zero gradient is never counted.
        on: ``"parameters"`` (exact, eq. 3 on the shared parameters' Jacobian) or
            ``"representation"`` (approximate: the same rule on the gradients w.r.t. the shared
            module's output, from their Gram matrix; no parameter Jacobian on checked steps).
        reduce: with ``on="representation"``, ``"flatten"`` compares the ``B*D`` per-sample
            gradients, ``"mean"`` their batch sums (:func:`representation_gram`).
    """

    rule: Literal["majority", "any"] = "majority"
    on: Literal["parameters", "representation"] = "parameters"
    reduce: Literal["flatten", "mean"] = "flatten"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.on not in SOURCES:
            raise ValueError(f"on must be one of {SOURCES}, got {self.on!r}")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {self.reduce!r}")

    @staticmethod
    def threshold(k: int) -> int:
        return math.ceil(k / 2)

    def __call__(self, jacobian: Tensor | None, gramian: Tensor | None = None) -> TriggerResult:
        """Decide from the ``K x P`` Jacobian, or from ``gramian`` (``J J^T``) when it is given
        (``K x K`` work instead of a pass over ``J``)."""
        if gramian is not None:
            return self.from_gram(gramian)
        if jacobian is None:
            raise ValueError("the trigger needs the Jacobian or its Gramian")
        return self.decide(conflict_cosines(jacobian))

    def from_gram(self, gram: Tensor) -> TriggerResult:
        """The same decision from the ``K x K`` Gram matrix of the task gradients."""
        return self.decide(conflict_cosines_from_gram(gram))

    def check(self, record: StepRecord) -> TriggerResult | None:
        """The decision on a training step's record (global on every rank), or ``None`` when the
        record holds nothing this trigger reads."""
        if self.on == "representation":
            if record.representation_jacobian is None:
                raise RuntimeError(
                    "on='representation': the module recorded no representation this step; pass the shared "
                    "module to configure_multitask(shared=module) or call self.mark_representation(z) in "
                    "training_step")
            return self.from_gram(global_representation_gram(record.representation_jacobian, self.reduce))
        if record.jacobian is None and record.gramian is None:
            return None
        return self(record.jacobian, gramian=record.gramian)  # the Gramian engine records G only

    def decide(self, cos: Tensor) -> TriggerResult:
        """The rule applied to the ``K`` cosines ``cos(g_i, g_0)`` (NaN: no gradient, never counted)."""
        n = int((cos < 0).sum()) if self.rule == "majority" else int((cos <= 0).sum())
        need = self.threshold(cos.shape[0]) if self.rule == "majority" else 1
        return TriggerResult(fire=n >= need, num_conflicting=n, cosines=cos)
