"""FairGrad: alpha-fair resource allocation over tasks (Ban & Ji, 2024)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares
from torch import Tensor

from lightning_cost.aggregators.base import AggregationError, GramianAggregator
from lightning_cost.aggregators.mgda import gramian_as_float64, require_nonzero_norms, weights_like

__all__ = ["FairGrad"]


class FairGrad(GramianAggregator):
    """FairGrad (Ban & Ji, ICML 2024, "Fair Resource Allocation in Multi-Task Learning",
    Sec. 4: the optimality condition of the alpha-fair update).

    The update ``d = J^T w`` maximises the alpha-fair utility of the task improvements
    ``g_i . d``; its weights solve the nonlinear system::

        G w = w^(-1/alpha),   w > 0

    (``alpha = 1`` is proportional fairness, i.e. the Nash-MTL condition
    ``(G w)_i = 1 / w_i``; ``alpha -> inf`` approaches max-min fairness). As in the
    paper's implementation the system is solved by ``scipy.optimize.least_squares``
    (``trf``) from ``w = 1/K`` with bounds ``(0, inf)``, in float64. For conditioning
    the solve runs on ``G / s`` with ``s = max_i G_ii`` and the solution is mapped back
    exactly: if ``G_hat w_hat = w_hat^(-1/alpha)`` then ``w = s^(-alpha/(alpha+1)) w_hat``
    solves the original system (which has a unique solution: it is the stationary point
    of a strictly convex function). So ``J -> cJ`` scales ``w`` by ``c^(-2 alpha/(alpha+1))``.

    Args:
        alpha: the fairness parameter (paper default 2.0, its choice for most benchmarks).
        scale_and_clip: apply the post-processing of the authors' released code: the
            weights are multiplied by ``K`` and then shrunk so that ``||d|| <= max_norm``.
            Off by default (the paper's equation is returned as is).
        max_norm: the norm bound used when ``scale_and_clip`` is on (their value: 1.0).
        tol: largest accepted residual ``max_i |(G w)_i - w_i^(-1/alpha)| / w_i^(-1/alpha)``.

    Degenerate input: a zero task gradient makes ``(G w)_i = 0`` impossible to match, so
    it raises a ``ValueError`` naming the task. If the solver does not converge
    (``status <= 0``) or the residual exceeds ``tol`` (e.g. a singular ``G`` with no
    positive solution, such as ``g_2 = -g_1``), an :class:`AggregationError` is raised;
    there is no fallback to equal weights.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(
        self, alpha: float = 2.0, scale_and_clip: bool = False, max_norm: float = 1.0, tol: float = 1e-6
    ) -> None:
        super().__init__()
        if not alpha > 0.0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not max_norm > 0.0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.alpha = float(alpha)
        self.scale_and_clip = bool(scale_and_clip)
        self.max_norm = float(max_norm)
        self.tol = float(tol)

    def solve(self, gramian: np.ndarray) -> np.ndarray:
        """The solution ``w`` of ``G w = w^(-1/alpha)`` for a float64 Gramian (no post-processing)."""
        require_nonzero_norms(gramian, "FairGrad", "G w = w^(-1/alpha) then has no solution")
        k = gramian.shape[0]
        s = float(np.max(np.diag(gramian)))
        g = gramian / s
        inv = -1.0 / self.alpha

        def residual(w: np.ndarray) -> np.ndarray:
            return g @ w - np.power(w, inv)

        def jac(w: np.ndarray) -> np.ndarray:
            return g - np.diag(inv * np.power(w, inv - 1.0))

        res = least_squares(
            residual,
            np.full(k, 1.0 / k),
            jac=jac,
            bounds=(0.0, np.inf),
            method="trf",
            ftol=1e-12,
            xtol=1e-12,
            gtol=1e-12,
        )
        w_hat = res.x
        if res.status <= 0 or not np.all(np.isfinite(w_hat)) or np.any(w_hat <= 0.0):
            raise AggregationError(f"FairGrad: least_squares failed (status {res.status}: {res.message})")
        rel = np.max(np.abs(residual(w_hat)) / np.power(w_hat, inv))
        if not rel <= self.tol:
            raise AggregationError(
                f"FairGrad: no solution of G w = w^(-1/alpha) found (relative residual {rel:.3g} > tol {self.tol:g}); "
                "the Gramian may be singular"
            )
        return w_hat * s ** (-self.alpha / (self.alpha + 1.0))

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        w = self.solve(g)
        if self.scale_and_clip:
            w = w * g.shape[0]
            norm = float(np.sqrt(max(w @ g @ w, 0.0)))  # ||J^T w||
            if norm > self.max_norm:
                w = w * (self.max_norm / norm)
        return weights_like(w, gramian)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, scale_and_clip={self.scale_and_clip}"
