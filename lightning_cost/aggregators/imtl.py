"""IMTL-G: impartial multi-task learning, gradient balance (Liu et al., 2021)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from lightning_cost.aggregators._common import gramian_as_float64, require_nonzero_norms, weights_like
from lightning_cost.aggregators.base import AggregationError, GramianAggregator

__all__ = ["IMTLG"]


class IMTLG(GramianAggregator):
    """IMTL-G (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, ICLR 2021, "Towards
    Impartial Multi-task Learning", Sec. 3.2, the closed form of IMTL-G).

    Finds ``d = sum_i alpha_i g_i`` with ``sum_i alpha_i = 1`` whose projections onto all
    unit task gradients ``u_i = g_i / ||g_i||`` are equal (``d . u_1 = d . u_i``). With the
    ``(K-1) x P`` matrices ``D`` (rows ``g_1 - g_i``) and ``U`` (rows ``u_1 - u_i``),
    ``i = 2..K``::

        alpha_{2:K} = g_1 U^T (D U^T)^{-1},    alpha_1 = 1 - sum_{i>=2} alpha_i

    Every entry needs only ``g_a . u_b = G_ab / sqrt(G_bb)``, so the solve runs on the
    Gramian (float64). The paper also has a loss-scale part (IMTL-L) and suggests the
    gradients of the shared *representation* for speed; this class is IMTL-G on whatever
    Jacobian it is given. The weights can be negative, as in the paper.

    Degenerate input: a zero task gradient has no unit direction, so it raises a
    ``ValueError`` naming the task. When ``D U^T`` is singular (e.g. two identical
    gradients) the minimum-norm solution of the linear system is used: ``d`` is still
    the equal-projection direction, but the split of weight between identical gradients
    is arbitrary. If the system has no solution (residual above ``1e-8`` relative) an
    :class:`AggregationError` is raised. Under ``J -> cJ`` the weights are unchanged,
    and rescaling a single task's gradient by ``c_i > 0`` only rescales ``d``.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        norms = require_nonzero_norms(g, "IMTL-G", "IMTL-G needs every unit gradient g_i / ||g_i||")
        gu = g / norms  # gu[a, b] = g_a . u_b  (norms broadcast along the columns)
        # rhs_j = g_1 . (u_1 - u_j);  M[i, j] = (g_1 - g_i) . (u_1 - u_j),  i, j = 2..K
        rhs = gu[0, 0] - gu[0, 1:]
        m = rhs - (gu[1:, :1] - gu[1:, 1:])
        # alpha_{2:K} M = rhs  <=>  M^T alpha_{2:K} = rhs
        if m.shape == (1, 1):  # K = 2: the minimum-norm solution of a x = b is b / a (0 if a = 0)
            tail = rhs / m[0] if m[0, 0] != 0.0 else np.zeros(1)
        else:
            tail, *_ = np.linalg.lstsq(m.T, rhs, rcond=None)
        residual = np.linalg.norm(m.T @ tail - rhs)
        if not np.isfinite(tail).all() or residual > 1e-8 * max(np.max(norms), np.linalg.norm(rhs)):
            raise AggregationError(
                f"IMTL-G: the equal-projection system has no solution (residual {residual:.3g})"
            )
        alpha = np.concatenate([[1.0 - tail.sum()], tail])
        return weights_like(alpha, gramian)
