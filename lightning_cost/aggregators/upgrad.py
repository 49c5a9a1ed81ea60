"""UPGrad: the mean of the task gradients each projected onto the dual cone (Quinton & Rey, 2024)."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
from torch import Tensor

from lightning_cost.aggregators._common import dual_cone_weights, gramian_as_float64, weights_like
from lightning_cost.aggregators.base import GramianAggregator

__all__ = ["DualConeMean", "UPGrad"]


class DualConeMean(GramianAggregator):
    """The mean of the projections onto the dual cone of ``J``'s rows of ``J^T u`` for each row
    ``u`` of :meth:`targets` (UPGrad: the rows of ``I``; DualProj: one row ``1/K``).

    Args:
        tol: relative tolerance of the KKT test each solve must pass (default ``1e-8``).
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, tol: float = 1e-8) -> None:
        super().__init__()
        if not 0.0 < tol < 1.0:
            raise ValueError(f"tol must be in (0, 1), got {tol}")
        self.tol = float(tol)

    @abstractmethod
    def targets(self, k: int) -> np.ndarray:
        """The weights ``u`` (rows, ``n x K``) of the vectors ``J^T u`` to project."""

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        projected = dual_cone_weights(g, self.targets(g.shape[0]), self.tol)  # row r: pi_J(J^T u_r)'s weights
        return weights_like(projected.mean(axis=0), gramian)

    def extra_repr(self) -> str:
        return f"tol={self.tol:g}"


class UPGrad(DualConeMean):
    """Unconflicting projection of gradients (Quinton & Rey, arXiv:2406.16232, 2024,
    "Jacobian Descent for Multi-Objective Optimization": the projection ``pi_J`` onto the dual
    cone, Eq. 3, averaged over the task gradients; computed on the Gramian by its dual, Prop. 1).

    Each task gradient ``g_i`` is projected onto the dual cone of the rows of ``J``, the vectors
    ``x`` with ``g_j . x >= 0`` for every task ``j``, and the projections are averaged. In weight
    space the projection of ``J^T u`` is ``J^T w`` with::

        w = argmin_w  w^T G w   s.t.  w >= u  (elementwise)

    so with ``u = e_i`` for each task ``i``, ``d = J^T (1/K) sum_i w^(i)``. The ``K`` quadratic
    programs are solved exactly on the float64 Gramian by an active-set method
    (:func:`~lightning_cost.aggregators._common.dual_cone_weights`, no QP package and no
    regularisation of ``G``). The update conflicts with no task: ``g_j . d >= 0`` for all ``j``; if
    no pair of gradients conflicts (``G e_i >= 0`` for all ``i``) every ``g_i`` is its own projection
    and ``d`` is the mean gradient. Weights are unchanged under ``J -> cJ`` (``c > 0``).

    Args:
        tol: relative tolerance of the KKT test each solve must pass (default ``1e-8``).

    Degenerate input: a zero task gradient is its own projection (it constrains nothing, its
    weight stays ``1/K`` and adds nothing to ``d``); an all-zero Jacobian gives ``d = 0``. The QPs
    are always feasible (``w = e_i``) and bounded; a solve that misses the KKT conditions by more
    than ``tol`` (only possible through rounding on a badly conditioned ``G``) raises
    :class:`~lightning_cost.aggregators.base.AggregationError`. A non-finite Gramian raises
    ``ValueError``. Unlike TorchJD's default projector, ``G`` is neither normalised nor
    regularised (TorchJD adds ``1e-4 I`` to ``G / tr G``, which moves ``d`` by about that much).
    """

    def targets(self, k: int) -> np.ndarray:
        return np.eye(k)  # row i: g_i itself
