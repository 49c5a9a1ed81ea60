"""MGDA: the min-norm point of the convex hull of the task gradients (Sener & Koltun, 2018)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from lightning_cost.aggregators._common import (
    gramian_as_float64,
    min_norm_weights,
    require_nonzero_norms,
    weights_like,
)
from lightning_cost.aggregators.base import GramianAggregator

__all__ = ["MGDA"]


class MGDA(GramianAggregator):
    """Multiple-gradient descent (Sener & Koltun, NeurIPS 2018, "Multi-Task Learning as
    Multi-Objective Optimization", Sec. 3, problem (3) / MGDA-UB with the Gramian of the
    shared-parameter gradients).

    The weights are the min-norm element of the convex hull of the task gradients::

        w = argmin_{w >= 0, sum(w) = 1} || sum_i w_i g_i ||^2 = argmin w^T G w

    solved exactly on the ``K x K`` Gramian by Wolfe's min-norm-point algorithm (an
    active-set method; no step size, no tolerance-limited iteration). The update is
    ``d = J^T w``; it is zero iff the gradients are Pareto-stationary (``0`` lies in
    their convex hull).

    Args:
        normalization: gradient normalisation applied before the solve, as in the
            authors' released code (``"l2"``: each ``g_i`` divided by its norm). The
            default is ``"none"`` (no normalisation, the paper's formulation). With
            ``"l2"`` the weights are computed on the normalised Gramian
            ``G_ij / (|g_i||g_j|)`` and, as in that code, applied to the *unnormalised*
            gradients (the loss is re-weighted). The loss-based variants (``"loss"``,
            ``"loss+"``) need the task losses, which an aggregator does not receive, so
            they are not offered.

    Degenerate input: a zero task gradient makes the min-norm point ``0`` (all weight
    on that task, ``d = 0``) with ``normalization="none"``; with ``"l2"`` it raises a
    ``ValueError`` naming the task. An all-zero Jacobian gives uniform weights and
    ``d = 0``. Scaling ``J -> cJ`` leaves the weights unchanged (``d -> cd``).
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, normalization: str = "none") -> None:
        super().__init__()
        if normalization not in ("none", "l2"):
            raise ValueError(f"normalization must be 'none' or 'l2', got {normalization!r}")
        self.normalization = normalization

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        if self.normalization == "l2":
            norms = require_nonzero_norms(g, "MGDA(normalization='l2')", "'l2' divides by each gradient norm")
            g = g / np.outer(norms, norms)
        return weights_like(min_norm_weights(g), gramian)

    def extra_repr(self) -> str:
        return f"normalization={self.normalization!r}"
