"""Nash-MTL: the Nash bargaining solution over task gradients (Navon et al., 2022)."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
from torch import Tensor

from lightning_cost.aggregators._common import gramian_as_float64, require_nonzero_norms, weights_like
from lightning_cost.aggregators.base import AggregationError, GramianAggregator
from lightning_cost.aggregators.fairgrad import newton_potential_min

__all__ = ["NashMTL"]

#: A CCP iterate is accepted when max_i |alpha_i (G alpha)_i - 1| is below this after max_iter steps.
_ACCEPT = 1e-3


#: The optional extra that installs Nash-MTL's solver stack.
INSTALL_HINT = "pip install 'lightning-cost[nashmtl]'"
#: ``solver`` value for the damped Newton solve (no cvxpy)
NEWTON = "newton"


def _require_solver_packages(solver: str) -> None:
    """Raise an ImportError naming the ``nashmtl`` extra when cvxpy (or ECOS, for ``solver="ECOS"``)
    is missing: Nash-MTL's convex sub-problems need them, the other methods do not."""
    needed = ["cvxpy"] + (["ecos"] if solver.upper() == "ECOS" else [])
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(f"Nash-MTL needs {' and '.join(needed)} ({name} is missing): {INSTALL_HINT}") from err


class _CCPProblem:
    """The convex sub-problem of one CCP step, built once per K (cvxpy, DPP-parametrised)."""

    def __init__(self, k: int) -> None:
        import cvxpy as cp

        self.alpha = cp.Variable(k, nonneg=True)
        self.gramian = cp.Parameter((k, k))
        self.cost = cp.Parameter(k)
        # phi_i(alpha) = log(alpha_i) + log((G alpha)_i) >= 0  <=>  alpha_i (G alpha)_i >= 1
        phi = cp.log(self.alpha) + cp.log(self.gramian @ self.alpha)
        self.problem = cp.Problem(cp.Minimize(self.cost @ self.alpha), [phi >= 0])


class NashMTL(GramianAggregator):
    """Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, ICML 2022,
    "Multi-Task Learning as a Bargaining Game", Sec. 3-4).

    The Nash bargaining update ``d = J^T alpha`` has weights ``alpha > 0`` with::

        (G alpha)_i = 1 / alpha_i    for every task i

    found as in the paper by a sequence of convex problems (concave-convex procedure):
    with ``phi_i(a) = log(a_i) + log((G a)_i)`` (concave) and ``Phi = sum_i phi_i``, step
    ``t`` minimises the linearisation of ``Phi`` at ``a_t`` (plus ``sum_i (G a)_i``) over
    the convex set ``phi_i(a) >= 0``::

        min_a  sum_i (G a)_i + grad Phi(a_t)^T a     s.t.  phi_i(a) >= 0,  a >= 0

    where ``grad Phi(a) = 1/a + G (1 / (G a))``. It stops when
    ``max_i |a_i (G a)_i - 1| <= tol``, when the iterate stops moving, or after
    ``max_iter`` steps. Each step is solved by cvxpy with ``solver`` (ECOS, as the authors).
    The previous call's solution is the starting point (ones at the first call). If
    ``Phi`` is undefined there (some ``(G a)_i <= 0``, common when a task conflicts with
    the others), the start is replaced by the feasible point ``argmin sum(a)`` s.t.
    ``phi_i(a) >= 0`` (one extra solve); starting from ones regardless fails often.

    ``solver="newton"`` solves the same equation without cvxpy: ``a_i (G a)_i = 1`` is the
    stationarity condition of the strictly convex ``1/2 a^T G a - sum_i log a_i`` (FairGrad's
    potential at ``alpha = 1``), minimised by damped Newton from the diagonal solution; its one
    solution is the CCP's limit, reached to ``1e-13`` relative residual in a few steps (the CCP
    needs one conic solve per step). A missing solution raises as with the CCP.

    Gramian normalisation: the CCP runs on the cosine matrix ``C = D^-1 G D^-1``
    (``D = diag ||g_i||``): if ``b`` solves ``b_i (C b)_i = 1``, then ``a* = D^-1 b`` solves
    ``a_i (G a)_i = 1`` exactly. So the solve is invariant to each task's gradient scale: a task
    whose loss is scaled by ``s`` changes ``G``'s conditioning by up to ``s^2`` but leaves ``C``
    as it is (the authors' code solves for ``G / ||G||_F``, on which the convex sub-problems fail
    once the gradient norms differ by orders of magnitude). With ``normalize_gramian=True``
    (default, the authors' choice) the solution for ``G_n = G / ||G||_F`` is returned,
    ``a_n = a* sqrt(||G||_F)``: the direction is the Nash direction, its length is
    ``sqrt(||G||_F)`` times larger, ``a_n,i (G a_n)_i = ||G||_F``, and the weights are invariant
    under ``J -> cJ``. With ``normalize_gramian=False`` ``a*`` is returned (``d`` is then
    invariant under ``J -> cJ``, and under each task's scale separately).

    The authors' code also clips the gradient norm (``max_norm``); that is an optimizer
    setting (Lightning's ``gradient_clip_val``) and is not applied here.

    Args:
        max_iter: CCP steps per call (paper code default 20).
        update_weights_every: recompute the weights every n-th call and reuse the last
            ones in between (default 1: every call).
        solver: cvxpy solver name for the CCP (default ``"ECOS"``), or ``"newton"`` (see above).
        normalize_gramian: return the weights for ``G / ||G||_F`` (default ``True``, see above).
        tol: early-stopping threshold on ``max_i |alpha_i (G alpha)_i - 1|``.

    Degenerate input: a zero task gradient makes ``(G alpha)_i = 1/alpha_i`` impossible,
    so it raises a ``ValueError`` naming the task. A missing solver, a solver error or a
    non-optimal status (e.g. infeasible for ``g_2 = -g_1``), and a final residual above
    ``1e-3``, raise :class:`AggregationError`; there is no fallback to equal weights.
    cvxpy (and ECOS for the default solver) come with the optional extra ``nashmtl``; without
    them the constructor raises an ``ImportError`` saying so.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(
        self,
        max_iter: int = 20,
        update_weights_every: int = 1,
        solver: str = "ECOS",
        normalize_gramian: bool = True,
        tol: float = 1e-6,
    ) -> None:
        super().__init__()
        if max_iter < 1 or update_weights_every < 1:
            raise ValueError("max_iter and update_weights_every must be >= 1")
        self.max_iter = int(max_iter)
        self.update_weights_every = int(update_weights_every)
        if solver != NEWTON:
            _require_solver_packages(solver)
        self.solver = solver
        self.normalize_gramian = bool(normalize_gramian)
        self.tol = float(tol)
        self._problems: dict[int, _CCPProblem] = {}
        self._prev_alpha: np.ndarray | None = None  # the last solution for G / ||G||_F (also the next start)
        self._last_scale = 1.0
        self._step = 0

    def _problem(self, k: int) -> _CCPProblem:
        if k not in self._problems:  # the solver check scans cvxpy's solvers: once per problem, not per step
            import cvxpy as cp  # present: the constructor checked

            if self.solver not in cp.installed_solvers():
                raise AggregationError(
                    f"Nash-MTL: cvxpy solver {self.solver!r} is not installed (installed: {cp.installed_solvers()})"
                )
            self._problems[k] = _CCPProblem(k)
        return self._problems[k]

    def _step_solve(self, prob: _CCPProblem, cost: np.ndarray) -> np.ndarray:
        prob.cost.value = cost
        try:
            prob.problem.solve(solver=self.solver)
        except Exception as err:  # cvxpy raises SolverError and others
            raise AggregationError(f"Nash-MTL: solver {self.solver} failed: {err}") from err
        new = prob.alpha.value
        if prob.problem.status not in ("optimal", "optimal_inaccurate") or new is None:
            raise AggregationError(f"Nash-MTL: solver {self.solver} returned status {prob.problem.status!r}")
        if not np.all(np.isfinite(new)) or np.any(new <= 0.0):
            raise AggregationError(f"Nash-MTL: solver returned non-positive weights {new.tolist()}")
        return np.asarray(new, dtype=np.float64)

    def solve(self, gramian: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
        """Run the CCP on a float64 Gramian and return ``alpha`` with ``alpha_i (G alpha)_i ~= 1``."""
        k = gramian.shape[0]
        if self.solver == NEWTON:
            return self._newton_solve(gramian)
        prob = self._problem(k)
        prob.gramian.value = gramian
        alpha = np.ones(k) if start is None or start.shape != (k,) else start.copy()
        if np.any(alpha <= 0.0) or np.any(gramian @ alpha <= 0.0):
            # Phi is undefined where (G a)_i <= 0: start from a feasible point instead,
            # min sum(a) s.t. a_i (G a)_i >= 1 (then G a > 0).
            alpha = self._step_solve(prob, np.ones(k))
        col_sums = gramian.sum(axis=0)  # d/da sum_i (G a)_i
        residual = np.inf
        for _ in range(self.max_iter):
            new = self._step_solve(prob, col_sums + 1.0 / alpha + gramian @ (1.0 / (gramian @ alpha)))
            moved = np.linalg.norm(new - alpha)
            alpha = new
            residual = float(np.max(np.abs(alpha * (gramian @ alpha) - 1.0)))
            if residual <= self.tol or moved <= 1e-9 * np.linalg.norm(alpha):
                break
        if not residual <= _ACCEPT:
            raise AggregationError(
                f"Nash-MTL: no alpha with alpha_i (G alpha)_i = 1 after {self.max_iter} steps (residual {residual:.3g})"
            )
        return alpha

    def _newton_solve(self, gramian: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):  # no solution drives the iterates to 0 or infinity
            alpha = newton_potential_min(gramian, np.ones(gramian.shape[0]), 0.0)
            residual = float(np.max(np.abs(alpha * (gramian @ alpha) - 1.0)))
        if not (np.all(np.isfinite(alpha)) and np.all(alpha > 0.0) and residual <= self.tol):
            raise AggregationError(f"Nash-MTL: no alpha with alpha_i (G alpha)_i = 1 (Newton residual {residual:.3g})")
        return alpha

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        k = g.shape[0]
        reuse = self._step % self.update_weights_every != 0
        self._step += 1
        if not (reuse and self._prev_alpha is not None and self._prev_alpha.shape == (k,)):
            norms = require_nonzero_norms(g, "Nash-MTL", "(G alpha)_i = 1 / alpha_i then has no solution")
            # Solve on the cosines C = D^-1 G D^-1: alpha* = b / norms, alpha_n = alpha* sqrt(||G||_F).
            root_fro = float(np.sqrt(np.linalg.norm(g)))
            prev = self._prev_alpha
            start = prev * norms / root_fro if prev is not None and prev.shape == (k,) else None
            b = self.solve(g / np.outer(norms, norms), start)
            self._prev_alpha = b / norms * root_fro
            self._last_scale = 1.0 if self.normalize_gramian else 1.0 / root_fro
        return weights_like(self._prev_alpha * self._last_scale, gramian)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_problems"] = {}  # cvxpy problems are rebuilt on demand (cheap), not pickled
        return state

    def get_extra_state(self) -> Any:
        prev = None if self._prev_alpha is None else self._prev_alpha.tolist()
        return {"prev_alpha": prev, "scale": self._last_scale, "step": self._step}

    def set_extra_state(self, state: Any) -> None:
        prev = state.get("prev_alpha")
        self._prev_alpha = None if prev is None else np.asarray(prev, dtype=np.float64)
        self._last_scale = float(state.get("scale", 1.0))
        self._step = int(state.get("step", 0))

    def extra_repr(self) -> str:
        return (
            f"max_iter={self.max_iter}, update_weights_every={self.update_weights_every}, "
            f"solver={self.solver!r}, normalize_gramian={self.normalize_gramian}"
        )
