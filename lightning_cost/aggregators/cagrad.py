"""CAGrad: conflict-averse gradient descent (Liu et al., 2021)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

from lightning_cost.aggregators._common import gramian_as_float64, min_norm_weights, weights_like
from lightning_cost.aggregators.base import AggregationError, GramianAggregator

__all__ = ["CAGrad"]


class CAGrad(GramianAggregator):
    """Conflict-Averse Gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021, Sec. 3.1).

    The update maximises the worst task improvement in a ball around the average
    gradient ``g0 = (1/K) sum_i g_i``::

        max_d min_i g_i^T d   s.t.  ||d - g0|| <= c ||g0||

    solved through the paper's dual over the simplex::

        w* = argmin_w  F(w) = g_w^T g0 + sqrt(phi) ||g_w||,   g_w = J^T w,  phi = c^2 ||g0||^2
        d  = g0 + sqrt(phi) / ||g_w*|| * g_w*

    so the weights are ``1/K + sqrt(phi) / ||g_w*|| * w*``.

    Solver (exact, Gramian only). With ``s = sqrt(phi)`` and ``sqrt(q) = min_{t>0} q/(2t) + t/2``,
    ``min_w F`` equals ``min_{t>0} [min_w (s/2t) ||g_w + (t/s) g0||^2 + const(t)]``: for fixed
    ``t`` the inner problem is the MGDA min-norm problem for the shifted gradients
    ``g_i + (t/s) g0`` (solved exactly by :func:`~lightning_cost.aggregators._common.min_norm_weights`
    on their Gramian), and the outer optimum is the root of the monotone function
    ``t - ||g_w(t)||``, found by Brent's method to machine precision.

    Args:
        c: the radius hyper-parameter (paper default 0.4, used for CityScapes/NYUv2).
        rescale: as in the authors' released code: ``0`` returns ``d``, ``1`` (default)
            returns ``d / (1 + c^2)``, ``2`` returns ``d / (1 + c)``.

    Degenerate input: CAGrad divides by ``||g_w*||``, not by a task-gradient norm, so a
    zero task gradient is allowed. If ``g0 = 0`` or ``c = 0`` the update is ``g0``
    (uniform weights). If the dual optimum has ``||g_w*|| <= sqrt(eps) * max_i ||g_i||``
    (``eps`` of the Gramian's dtype; this happens when ``0`` is, or nearly is, in the
    convex hull of the gradients) the direction ``g_w* / ||g_w*||`` is numerically
    undefined and the update falls back to ``g0`` (the authors' code, which adds ``1e-4``
    to ``||g_w||``, behaves the same way in that limit). Under ``J -> aJ`` (``a > 0``)
    the weights are unchanged.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, c: float = 0.4, rescale: int = 1) -> None:
        super().__init__()
        if not c >= 0.0:
            raise ValueError(f"c must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale}")
        self.c = float(c)
        self.rescale = rescale

    def _scale(self) -> float:
        return {0: 1.0, 1: 1.0 / (1.0 + self.c**2), 2: 1.0 / (1.0 + self.c)}[self.rescale]

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        k = g.shape[0]
        out = np.full(k, 1.0 / k)
        b = g.mean(axis=1)  # b_i = g_i . g0
        g0_sq = max(float(g.mean()), 0.0)  # ||g0||^2
        s = self.c * np.sqrt(g0_sq)  # sqrt(phi)
        hi = float(np.sqrt(np.max(np.diag(g))))
        if s > 0.0 and hi > 0.0:
            ones = np.ones(k)
            last: list[int] = []  # the previous solve's support: Brent's nearby t rarely change it

            def inner(t: float) -> tuple[np.ndarray, float]:
                a = t / s
                shifted = g + a * (np.outer(b, ones) + np.outer(ones, b)) + a * a * g0_sq
                w = min_norm_weights(shifted, start=last)
                last[:] = np.flatnonzero(w).tolist()
                return w, float(np.sqrt(max(w @ g @ w, 0.0)))

            eps = (
                torch.finfo(gramian.dtype).eps
                if gramian.dtype.is_floating_point
                else np.finfo(np.float64).eps
            )
            lo = float(np.sqrt(eps)) * hi
            if lo - inner(lo)[1] < 0.0:  # otherwise ||g_w*|| <= lo: keep d = g0
                hi *= 1.0 + 1e-12
                if hi - inner(hi)[1] > 0.0:
                    t_star = brentq(lambda t: t - inner(t)[1], lo, hi, xtol=1e-15 * hi, maxiter=500)
                else:
                    t_star = hi
                w, gw_norm = inner(t_star)
                if not gw_norm > 0.0:
                    raise AggregationError(f"CAGrad dual solve produced ||g_w|| = {gw_norm}")
                out = out + (s / gw_norm) * w
        out = out * self._scale()
        return weights_like(out, gramian)

    def extra_repr(self) -> str:
        return f"c={self.c}, rescale={self.rescale}"
