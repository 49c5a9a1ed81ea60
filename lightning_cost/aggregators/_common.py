"""Helpers shared by the aggregators: Gramian validation and conversion, the simplex min-norm
solver (MGDA, CAGrad), the dual-cone projection (UPGrad, DualProj) and seeded generators
(PCGrad, GradDrop, Random)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.linalg import lapack
from torch import Tensor

from lightning_cost.aggregators.base import AggregationError, check_losses

__all__ = ["ObservedLosses", "SeededDraws", "dual_cone_weights", "ensure_task_buffers", "size_task_buffers_for", "gramian_as_float64", "int_hparam", "min_norm_weights", "real_hparam",
           "require_nonzero_norms", "seeded_generator", "simplex_projection", "weights_like"]

_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}
#: below this reciprocal condition number a KKT system is solved by least squares, not LU
_MIN_RCOND = 1e-10


def gramian_as_float64(gramian: Tensor) -> np.ndarray:
    """Validate a ``K x K`` Gramian (``K >= 2``, finite) and return it as a float64 numpy array."""
    if not isinstance(gramian, Tensor):
        raise TypeError(f"gramian must be a torch.Tensor, got {type(gramian).__name__}")
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"gramian must be a square [K, K] matrix, got shape {tuple(gramian.shape)}")
    if gramian.shape[0] < 2:
        raise ValueError(f"multi-task aggregation needs at least 2 tasks, got K={gramian.shape[0]}")
    # one device-to-host copy; the finiteness test then runs on the K x K numpy array
    if gramian.device.type == "cpu" and gramian.dtype in _NUMPY_DTYPE:
        g = gramian.detach().numpy().astype(np.float64)  # no torch dispatch for a tiny CPU tensor
    else:
        g = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(g).all():
        raise ValueError("gramian has non-finite entries")
    return 0.5 * (g + g.T)


def weights_like(weights: np.ndarray, gramian: Tensor) -> Tensor:
    """The (float64 numpy) weights as a tensor of the Gramian's dtype and device."""
    np_dtype = _NUMPY_DTYPE.get(gramian.dtype)
    if gramian.device.type == "cpu" and np_dtype is not None:
        return torch.from_numpy(weights.astype(np_dtype, copy=False))  # as torch.as_tensor, cheaper
    return torch.as_tensor(weights, dtype=gramian.dtype, device=gramian.device)


def require_nonzero_norms(gramian: np.ndarray, method: str, reason: str) -> np.ndarray:
    """Return the task-gradient norms ``sqrt(diag G)``; raise ``ValueError`` naming any zero-norm task."""
    norms = np.sqrt(np.maximum(gramian.diagonal(), 0.0))  # G is finite here: maximum == clip
    if not (norms > 0.0).all():
        zero = np.flatnonzero(norms <= 0.0).tolist()
        raise ValueError(f"{method}: the gradient of task(s) {zero} is zero, and {reason}")
    return norms


def checkpoint_safe(state: Any) -> Any:
    """``state`` with every NumPy array a tensor and every NumPy scalar a Python number (recursively
    through dicts, lists and tuples): Lightning loads checkpoints with ``torch.load(weights_only=True)``,
    which refuses NumPy objects. ``np.array(tensor, dtype=np.float64)`` turns them back, bit for bit."""
    if isinstance(state, np.ndarray):
        return torch.from_numpy(state.copy())
    if isinstance(state, np.generic):
        return state.item()
    if isinstance(state, dict):
        return {k: checkpoint_safe(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(checkpoint_safe(v) for v in state)
    return state


class SeededDraws:
    """For a method that draws from a private generator (PCGrad's orders, GradDrop's masks, Random's
    weights): :meth:`_seed` makes it, and the generator's state is the module's extra state, so a
    ``state_dict`` resumed run continues the same draws."""

    seed: int | None
    generator: torch.Generator

    def _seed(self, seed: int | None) -> None:
        self.seed = seed
        self.generator = seeded_generator(seed)

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"])


class ObservedLosses:
    """For an aggregator that reads the task losses (GradNorm, DB-MTL, MoCo): :meth:`observe_losses`
    keeps the last ``K`` losses (validated: finite, non-negative) until the next call, and
    :meth:`_losses_for` hands them to the aggregation, or says clearly that none were observed. They are
    the step's input, not state: the ``state_dict`` leaves them out (the mixin observes before each step)."""

    uses_losses: bool = True
    _observed: Tensor | None = None

    def observe_losses(self, losses: Tensor) -> None:
        check_losses(losses)
        if bool((losses < 0).any()):
            raise ValueError(f"{type(self).__name__} needs non-negative task losses, got {losses.detach().tolist()}")
        self._observed = losses.detach().to(device="cpu", dtype=torch.float64).clone()

    def _losses_for(self, k: int) -> Tensor:
        """The observed losses (float64, CPU) for a Jacobian or Gramian of ``k`` tasks."""
        name = type(self).__name__
        if self._observed is None:
            raise RuntimeError(f"{name} uses the task losses: call observe_losses(losses) first (the multi-task "
                               "mixin does so before every step; a direct aggregate() call must do it itself)")
        if self._observed.shape[0] != k:
            raise ValueError(f"{name}: observe_losses got {self._observed.shape[0]} task losses but the "
                             f"Jacobian has {k} rows")
        return self._observed


def ensure_task_buffers(module: torch.nn.Module, k: int, shapes: dict[str, tuple[int, ...]], method: str) -> None:
    """Allocate a stateful method's per-task buffers (``shapes``: name -> shape, ``K`` last) at the first call
    that knows ``K``, on the buffers' device; a clear error for a later call with another ``K``."""
    first = getattr(module, next(iter(shapes)))
    if first.numel() == 0:
        for name, shape in shapes.items():
            setattr(module, name, torch.zeros(*shape, device=first.device))
    elif first.shape[-1] != k:
        raise ValueError(f"{method} was set up for {first.shape[-1]} tasks but got {k} losses")


def size_task_buffers_for(module: torch.nn.Module, state_dict: dict[str, Tensor], prefix: str,
                          names: Sequence[str]) -> None:
    """Before a ``load_state_dict``: give the per-task buffers the saved shapes, since ``K`` may still be unknown
    (lazy) in the receiving instance."""
    for name in names:
        key = prefix + name
        if key in state_dict:
            setattr(module, name, torch.empty_like(state_dict[key], device=getattr(module, name).device))


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``, or with :func:`torch.initial_seed` when ``None``
    (so a run seeded by ``torch.manual_seed`` or ``seed_everything`` draws the same sequence again, in
    a rerun, on another DDP rank, or before a resume)."""
    return torch.Generator().manual_seed(int(torch.initial_seed()) if seed is None else int(seed))


def _affine_min_norm(gramian: np.ndarray, support: Sequence[int]) -> np.ndarray:
    """Coefficients ``mu`` (summing to 1) of the min-norm point of the affine hull of ``support``.

    Solved in the variables ``eta_i = ||g_i|| mu_i`` (the KKT system of ``min eta^T C eta`` s.t.
    ``sum_i eta_i / ||g_i|| = 1``, ``C`` the cosines of the support): its matrix has entries of
    order 1 however much the support's gradient norms differ, where the KKT system in ``mu``
    mixes ``||g_i||^2`` of every size and loses the small ones' digits.
    """
    idx = np.asarray(support, dtype=np.intp)
    n = idx.size
    sub = gramian.take(idx, axis=0).take(idx, axis=1)
    norms = np.sqrt(sub.diagonal())
    if not (norms > 0.0).all():  # a zero gradient in the support: it is the min-norm point itself
        norms = np.ones(n)
    inv = 1.0 / norms
    top = inv.max()
    kkt = np.empty((n + 1, n + 1))
    np.multiply(sub, np.multiply.outer(inv, inv), out=kkt[:n, :n])
    kkt[:n, n] = kkt[n, :n] = inv / top  # the constraint sum_i eta_i / ||g_i|| = 1, scaled to max entry 1
    kkt[n, n] = 0.0
    rhs = np.zeros(n + 1)
    rhs[n] = 1.0 / top
    return _solve_kkt(kkt, rhs)[:n] * inv


def _solve_kkt(kkt: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``kkt x = rhs`` by LU where the system is well conditioned (its reciprocal condition number,
    LAPACK's 1-norm estimate, at least :data:`_MIN_RCOND`), else by least squares (SVD), which
    also gives the minimum-norm solution of a singular system (an affinely dependent support).
    The LU path is about five times cheaper; both are backward stable where it is taken."""
    lu, _, x, info = lapack.dgesv(kkt, rhs)
    if info == 0 and np.isfinite(x).all():
        rcond, info = lapack.dgecon(lu, float(np.abs(kkt).sum(axis=0).max()))
        if info == 0 and rcond >= _MIN_RCOND:
            return x
    return np.linalg.lstsq(kkt, rhs, rcond=None)[0]


def min_norm_weights(gramian: np.ndarray, tol: float = 1e-12, max_iter: int | None = None,
                     start: Sequence[int] | None = None) -> np.ndarray:
    """``argmin_{w in simplex} w^T G w`` by Wolfe's (1976) min-norm-point algorithm.

    An exact active-set method that touches the points only through their inner
    products, so it runs on the Gramian. It terminates in finitely many steps and
    returns the weights of the min-norm point with an affinely independent support
    (the point ``J^T w`` is unique; ``w`` is unique when ``G`` is positive definite).
    An all-zero Gramian gives uniform weights.

    Stopping rule: the current point ``x = J^T lam`` is optimal when every vertex has
    ``x . g_j >= x . x``; the test accepts a shortfall of ``tol`` times ``lam^T |G| lam`` (the
    magnitude of the terms of ``x . x``, i.e. its rounding scale). It is relative to the current
    point, not to the largest gradient, so a task whose gradient is many orders of magnitude
    larger than the others' does not end the search while the small ones are far from optimal.

    ``start``: a support to start from (e.g. the previous solve's, for a nearby Gramian), used when
    its affine min-norm point lies inside the simplex (Wolfe's invariant), else the usual start; the
    optimum is the same, fewer major cycles are needed when the support has not changed.
    """
    k = gramian.shape[0]
    # (ndarray methods rather than the np.* wrappers: the same operations, less per-call overhead)
    scale = float(gramian.diagonal().max())
    if scale <= 0.0:
        return np.full(k, 1.0 / k)
    g = gramian / scale
    magnitude = np.abs(g)
    max_iter = 50 * k + 50 if max_iter is None else max_iter
    lam, support = _start(g, start, tol)
    for _ in range(max_iter):
        g_lam = g @ lam
        j = int(g_lam.argmin())
        # Optimality: every vertex p_j satisfies x.p_j >= x.x (up to tol, relative to x's terms).
        if lam @ g_lam - g_lam[j] <= tol * (lam @ magnitude @ lam) or j in support:
            return lam
        support.append(j)
        lam, support = _minor_cycle(g, lam, support, tol)
    raise AggregationError(f"min-norm solver did not converge in {max_iter} iterations (K={k})")


def _start(g: np.ndarray, start: Sequence[int] | None, tol: float) -> tuple[np.ndarray, list[int]]:
    """The first corral: ``start``'s affine min-norm point if it lies inside the simplex, else the
    vertex of least norm."""
    lam = np.zeros(g.shape[0])
    if start is not None and len(start) > 0:
        support = sorted(set(int(i) for i in start))
        mu = _affine_min_norm(g, support)
        if np.isfinite(mu).all() and (mu > tol).all():
            lam[support] = mu / mu.sum()
            return lam, support
    first = int(g.diagonal().argmin())
    lam[first] = 1.0
    return lam, [first]


def _minor_cycle(g: np.ndarray, lam: np.ndarray, support: list[int], tol: float) -> tuple[np.ndarray, list[int]]:
    """Wolfe's minor cycle: move toward the affine min-norm point of ``support``, dropping the
    vertices whose coefficient would turn negative, until that point lies inside the simplex."""
    k = g.shape[0]
    for _ in range(k + 1):  # each pass drops at least one vertex
        mu = _affine_min_norm(g, support)
        if (mu > tol).all():
            lam[:] = 0.0
            lam[support] = mu
            break
        cur = lam[support]
        neg = [i for i in range(len(support)) if mu[i] <= tol]
        ratios = [cur[i] / (cur[i] - mu[i]) if cur[i] > mu[i] else 0.0 for i in neg]
        theta = min(ratios)
        new = (1.0 - theta) * cur + theta * mu
        new[neg[int(np.argmin(ratios))]] = 0.0
        lam[:] = 0.0
        lam[support] = np.clip(new, 0.0, None)
        support = [s for s in support if lam[s] > tol]
        lam[[i for i in range(k) if i not in support]] = 0.0
        lam /= lam.sum()
    return lam, support


def dual_cone_weights(gramian: np.ndarray, lower: np.ndarray, tol: float = 1e-8) -> np.ndarray:
    """``w = argmin_w w^T G w`` s.t. ``w >= u`` (elementwise) for each row ``u`` of ``lower`` (``n x K``;
    returns the ``n x K`` weights).

    ``J^T w`` is then the projection of ``J^T u`` onto the dual cone ``{x : g_i . x >= 0 for all i}``
    (Quinton & Rey 2024, Prop. 1). With ``w = u + v`` this is a non-negative least-squares problem
    in ``v`` whose normal equations need only ``G``: find ``v >= 0`` with ``G (u + v) >= 0`` and
    ``v_i (G (u + v))_i = 0``. Solved exactly by block principal pivoting (Judice & Pires 1994, as
    Kim & Park, SIAM J. Sci. Comput. 2011, use it for NNLS: every wrong-signed variable changes
    side at once, with Murty's single exchange as the backup that ends cycles), each row starting
    from the previous row's passive set (the rows of UPGrad's ``I`` share most of it); where that
    does not settle in ``3 K + 10`` steps (a singular ``G``), from then on by Lawson & Hanson's
    active set (1974, Ch. 23), which needs no regularisation of ``G`` (but is slower). Each
    passive-set system is solved by LU or, where ill conditioned, least squares (:func:`_solve_kkt`);
    for a singular ``G`` (``K > P``, dependent gradients) ``w`` is not unique, ``J^T w`` is. The
    problem is always feasible (``w = u``) and bounded; a result that misses the KKT conditions by
    more than ``tol`` (relative to the terms of ``G w``) raises :class:`AggregationError`. An all-zero
    ``G`` gives ``w = u``.
    """
    lower = np.atleast_2d(np.asarray(lower, dtype=np.float64))
    k = gramian.shape[0]
    scale = float(gramian.diagonal().max())
    if scale <= 0.0:
        return lower.copy()
    g = gramian / scale
    mag = np.abs(g)
    out = np.empty_like(lower)
    passive = np.zeros(k, dtype=bool)
    pivoting = True  # until pivoting fails once (a singular G): then Lawson & Hanson for every row
    for row, u in enumerate(lower):
        b = -(g @ u)
        v, passive = _pivoting_nnls(g, mag, u, b, passive, tol) if pivoting else (None, passive)
        if v is None:
            pivoting = False
            v, passive = _lawson_hanson_nnls(g, mag, u, b, tol)
        w = u + v
        gw = g @ w
        slack = tol * (mag @ np.abs(w) + 1e-300)
        if (gw < -slack).any() or (np.abs(gw[v > 0.0]) > slack[v > 0.0]).any():
            raise AggregationError(f"dual-cone projection: no KKT point found (min g_i.d = {gw.min():.3g}, K={k})")
        out[row] = w
    return out


def _on_passive(g: np.ndarray, b: np.ndarray, passive: np.ndarray) -> np.ndarray:
    """The optimum of ``1/2 v^T G v - b^T v`` with ``v`` zero off ``passive``."""
    z = np.zeros(g.shape[0])
    idx = np.flatnonzero(passive)
    if idx.size:
        z[idx] = _solve_kkt(g.take(idx, 0).take(idx, 1), b[idx])
    return z


def _pivoting_nnls(g: np.ndarray, mag: np.ndarray, u: np.ndarray, b: np.ndarray, passive: np.ndarray,
                   tol: float) -> tuple[np.ndarray | None, np.ndarray]:
    """Block principal pivoting from ``passive``; ``(None, passive)`` if it does not settle."""
    passive = passive.copy()
    best, budget = g.shape[0] + 1, 3
    for _ in range(3 * g.shape[0] + 10):
        v = _on_passive(g, b, passive)
        y = g @ v - b  # G w: must be >= 0 off the passive set
        wrong = np.flatnonzero(np.where(passive, v < 0.0, y < -tol * (mag @ np.abs(u + v))))
        if wrong.size == 0:
            return np.maximum(v, 0.0), passive
        if wrong.size < best:
            best, budget = wrong.size, 3
        elif budget > 0:
            budget -= 1
        else:  # Murty's rule: only the largest wrong index changes side
            wrong = wrong[-1:]
        passive[wrong] = ~passive[wrong]
    return None, passive


def _lawson_hanson_nnls(g: np.ndarray, mag: np.ndarray, u: np.ndarray, b: np.ndarray,
                        tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Lawson & Hanson's active set from ``v = 0``: one variable enters per major step."""
    k = g.shape[0]
    v = np.zeros(k)
    passive = np.zeros(k, dtype=bool)
    for _ in range(3 * k + 10):
        r = b - g @ v  # -(G w): positive where raising w_j lowers the objective
        r[passive] = 0.0
        violated = r > tol * (mag @ np.abs(u + v))
        if not violated.any():
            break
        passive[int(np.where(violated, r, -np.inf).argmax())] = True
        for _ in range(k + 1):  # toward the optimum on the passive set, dropping what turns <= 0
            z = _on_passive(g, b, passive)
            if (z[passive] > 0.0).all():
                v = z
                break
            neg = np.flatnonzero(passive & (z <= 0.0))
            gap = v[neg] - z[neg]
            theta = float(np.min(np.where(gap > 0.0, v[neg] / np.where(gap > 0.0, gap, 1.0), 0.0)))
            v = v + theta * (z - v)
            passive &= v > 0.0
            v[~passive] = 0.0
    return v, passive


def real_hparam(name: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False) -> float:
    """``value`` as a float after checking it: a real number (``TypeError`` otherwise, ``bool`` included),
    finite and within ``[low, high]`` (each end open where asked; ``ValueError`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    x = float(value)
    below = x <= low if low_open else x < low
    above = high is not None and (x >= high if high_open else x > high)
    if not np.isfinite(x) or below or above:
        lo, hi = "(" if low_open else "[", ")" if high_open or high is None else "]"
        raise ValueError(f"{name} must be in {lo}{low:g}, {'inf' if high is None else f'{high:g}'}{hi}, got {value!r}")
    return x


def int_hparam(name: str, value: Any, low: int) -> int:
    """``value`` after checking it is an ``int`` (``TypeError`` otherwise, ``bool`` included) of at least ``low``
    (``ValueError`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return int(value)


def simplex_projection(y: np.ndarray) -> np.ndarray:
    """The Euclidean projection of ``y`` onto the probability simplex (Held, Wolfe & Crowder 1974; the
    sort-based form of Duchi et al. 2008): ``max(y - theta, 0)`` with the one ``theta`` that makes it sum to 1."""
    u = np.sort(y)[::-1]
    excess = np.cumsum(u) - 1.0
    ranks = np.arange(1, y.size + 1)
    n = int(np.flatnonzero(u * ranks > excess)[-1]) + 1  # the support's size (u_1 * 1 > u_1 - 1 always holds)
    return np.maximum(y - excess[n - 1] / n, 0.0)
