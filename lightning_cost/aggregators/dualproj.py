"""DualProj: the mean gradient projected onto the dual cone of the task gradients."""

from __future__ import annotations

import numpy as np

from lightning_cost.aggregators.upgrad import DualConeMean

__all__ = ["DualProj"]


class DualProj(DualConeMean):
    """Dual-cone projection of the mean (Quinton & Rey, arXiv:2406.16232, 2024, "Jacobian Descent
    for Multi-Objective Optimization", Eq. 3 and Prop. 1, one of its baselines: the projection of
    GEM, Lopez-Paz & Ranzato, NeurIPS 2017, Sec. 3, applied to the mean gradient).

    The mean gradient ``(1/K) sum_i g_i`` is projected onto the dual cone of the rows of ``J`` (the
    ``x`` with ``g_j . x >= 0`` for every task ``j``). In weight space, ``d = J^T w`` with::

        w = argmin_w  w^T G w   s.t.  w >= 1/K  (elementwise)

    one quadratic program, solved exactly on the float64 Gramian by the active-set method UPGrad
    uses (:func:`~lightning_cost.aggregators._common.dual_cone_weights`). ``d`` conflicts with no
    task (``g_j . d >= 0``); when the mean already conflicts with none (in particular when no pair
    of gradients conflicts) it is returned unchanged (``w = 1/K``). UPGrad projects each ``g_i``
    and then averages; DualProj averages and then projects once (one QP instead of ``K``).
    Weights are unchanged under ``J -> cJ`` (``c > 0``).

    Args:
        tol: relative tolerance of the KKT test the solve must pass (default ``1e-8``).

    Degenerate input: a zero task gradient constrains nothing (weight ``1/K``, no contribution);
    an all-zero Jacobian gives ``d = 0``. The QP is always feasible and bounded; a solve that
    misses the KKT conditions by more than ``tol`` raises
    :class:`~lightning_cost.aggregators.base.AggregationError`, a non-finite Gramian a
    ``ValueError``. ``G`` is not regularised (TorchJD's default projector solves for
    ``G / tr G + 1e-4 I``).
    """

    def targets(self, k: int) -> np.ndarray:
        return np.full((1, k), 1.0 / k)  # the mean gradient
