"""FairGrad: alpha-fair resource allocation over tasks (Ban & Ji, 2024)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from lightning_cost.aggregators._common import gramian_as_float64, require_nonzero_norms, weights_like
from lightning_cost.aggregators.base import AggregationError, GramianAggregator

__all__ = ["FairGrad"]

#: Newton stops once the relative residual is this small (then the accuracy check uses ``tol``).
_NEWTON_TOL = 1e-13
_NEWTON_MAX_ITER = 100


class FairGrad(GramianAggregator):
    """FairGrad (Ban & Ji, ICML 2024, "Fair Resource Allocation in Multi-Task Learning",
    Sec. 4: the optimality condition of the alpha-fair update).

    The update ``d = J^T w`` maximises the alpha-fair utility of the task improvements
    ``g_i . d``; its weights solve the nonlinear system::

        G w = w^(-1/alpha),   w > 0

    (``alpha = 1`` is proportional fairness, i.e. the Nash-MTL condition
    ``(G w)_i = 1 / w_i``; ``alpha -> inf`` approaches max-min fairness).

    Solver. The system is the stationarity condition of the strictly convex potential
    ``f(w) = 1/2 w^T G w - sum_i w_i^p / p`` (``p = 1 - 1/alpha``; ``-sum_i log w_i`` at
    ``alpha = 1``), so it has at most one solution, and a damped Newton method on ``f`` (Armijo
    backtracking, steps kept inside ``w > 0``) finds it without the spurious stationary points a
    least-squares fit of the residual has (the paper's code runs ``scipy.optimize.least_squares``
    from ``w = 1/K``, which stalls when the weights must span many orders of magnitude, e.g. when
    one task's loss is scaled up). The start is the diagonal solution
    ``w_i = G_ii^(-alpha/(alpha+1))``, exact when the task gradients are orthogonal.

    What the solve is invariant to: task permutations (equivariant), any ``J -> J Q`` with ``Q``
    orthogonal (it reads ``G`` only), and ``J -> cJ`` (the iterates are the same; ``w`` scales by
    ``c^(-2 alpha/(alpha+1))``). Newton's steps do not depend on how the variables are scaled, so
    weights spread over many orders of magnitude cost nothing by themselves: the solve depends on
    the cosines between the task gradients (``C = D^-1 G D^-1``, ``D = diag ||g_i||``) and, for
    ``alpha != 1``, on the gradient norms through the potential's per-task weights, but not on the
    condition number of ``G`` itself, which a task scaled by ``s`` can make ``s^2`` times worse.
    At ``alpha = 1`` it is invariant to each task's scale separately.

    Args:
        alpha: the fairness parameter (paper default 2.0, its choice for most benchmarks).
        scale_and_clip: apply the post-processing of the authors' released code: the
            weights are multiplied by ``K`` and then shrunk so that ``||d|| <= max_norm``.
            Off by default (the paper's equation is returned as is).
        max_norm: the norm bound used when ``scale_and_clip`` is on (their value: 1.0).
        tol: largest accepted residual ``max_i |(G w)_i - w_i^(-1/alpha)| / w_i^(-1/alpha)``.

    Degenerate input: a zero task gradient makes ``(G w)_i = 0`` impossible to match, so
    it raises a ``ValueError`` naming the task. If the residual of the solution exceeds
    ``tol`` (e.g. a singular ``G`` with no positive solution, such as ``g_2 = -g_1``), an
    :class:`AggregationError` is raised; there is no fallback to equal weights.
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
        norms = require_nonzero_norms(gramian, "FairGrad", "G w = w^(-1/alpha) then has no solution")
        w0 = norms ** (-2.0 * self.alpha / (self.alpha + 1.0))  # the diagonal solution
        p = 1.0 - 1.0 / self.alpha
        with np.errstate(all="ignore"):  # a system with no solution drives w to 0 or infinity
            v = newton_potential_min(gramian * np.outer(w0, w0), w0**p, p)
            w = w0 * v
            rel = float(np.max(np.abs(gramian @ w * w ** (1.0 / self.alpha) - 1.0)))
        if not (np.all(np.isfinite(w)) and np.all(w > 0.0) and rel <= self.tol):
            raise AggregationError(
                f"FairGrad: no solution of G w = w^(-1/alpha) found (relative residual {rel:.3g} > tol {self.tol:g}); "
                "the Gramian may be singular"
            )
        return w

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


def newton_potential_min(h: np.ndarray, c: np.ndarray, p: float) -> np.ndarray:
    """Minimise ``f(v) = 1/2 v^T H v - sum_i c_i v_i^p / p`` (``c_i log v_i`` at ``p = 0``) over
    ``v > 0`` by damped Newton from ``v = 1``.

    ``f`` is FairGrad's potential in the variables ``v = w / w0``; its stationarity condition
    ``(H v)_i = c_i v_i^(p-1)`` is ``G w = w^(-1/alpha)``. A step is accepted on Armijo's
    condition or, where rounding hides the decrease of ``f`` near the solution, on a smaller
    relative residual. Returns the last iterate; the caller checks its residual.
    """
    v = np.ones(h.shape[0])

    def potential(x: np.ndarray) -> float:
        return float(0.5 * x @ h @ x - (c @ np.log(x) if p == 0.0 else c @ x**p / p))

    def residual(x: np.ndarray, hx: np.ndarray) -> float:
        return float(np.max(np.abs(hx / (c * x ** (p - 1.0)) - 1.0)))

    fv, hv = potential(v), h @ v
    res = residual(v, hv)
    for _ in range(_NEWTON_MAX_ITER):
        if not res > _NEWTON_TOL:  # converged (or NaN: let the caller's check fail)
            break
        grad = hv - c * v ** (p - 1.0)
        try:
            step = np.linalg.solve(h + np.diag(c * (1.0 - p) * v ** (p - 2.0)), -grad)
        except np.linalg.LinAlgError:
            break
        shrink = step < 0.0  # keep v > 0: at most 99 % of the way to the boundary
        t = min(1.0, 0.99 * float(np.min(-v[shrink] / step[shrink]))) if shrink.any() else 1.0
        slope = float(grad @ step)
        while t > 1e-12:
            new = v + t * step
            f_new, h_new = potential(new), h @ new
            res_new = residual(new, h_new)
            if f_new <= fv + 1e-4 * t * slope or res_new < res:
                break
            t *= 0.5
        else:
            break  # no progress possible at this precision
        v, fv, hv, res = new, f_new, h_new, res_new
    return v
