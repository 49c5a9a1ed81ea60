"""MGDA: the min-norm point of the convex hull of the task gradients (Sener & Koltun, 2018).

Besides :class:`MGDA` this module holds two helpers shared by the Gramian-based methods
(:func:`gramian_as_float64`, :func:`require_nonzero_norms`) and the exact simplex
min-norm solver :func:`min_norm_weights`, which CAGrad reuses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_cost.aggregators.base import AggregationError, GramianAggregator

__all__ = ["MGDA", "gramian_as_float64", "min_norm_weights", "require_nonzero_norms", "weights_like"]

_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


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


def _affine_min_norm(gramian: np.ndarray, support: Sequence[int]) -> np.ndarray:
    """Coefficients ``mu`` (summing to 1) of the min-norm point of the affine hull of ``support``."""
    s = list(support)
    n = len(s)
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = gramian[s][:, s]
    kkt[:n, n] = 1.0
    kkt[n, :n] = 1.0
    rhs = np.zeros(n + 1)
    rhs[n] = 1.0
    return np.linalg.lstsq(kkt, rhs, rcond=None)[0][:n]


def min_norm_weights(gramian: np.ndarray, tol: float = 1e-12, max_iter: int | None = None) -> np.ndarray:
    """``argmin_{w in simplex} w^T G w`` by Wolfe's (1976) min-norm-point algorithm.

    An exact active-set method that touches the points only through their inner
    products, so it runs on the Gramian. It terminates in finitely many steps and
    returns the weights of the min-norm point with an affinely independent support
    (the point ``J^T w`` is unique; ``w`` is unique when ``G`` is positive definite).
    ``tol`` is relative to ``max_i G_ii``. An all-zero Gramian gives uniform weights.
    """
    k = gramian.shape[0]
    # (ndarray methods rather than the np.* wrappers: the same operations, less per-call overhead)
    scale = float(gramian.diagonal().max())
    if scale <= 0.0:
        return np.full(k, 1.0 / k)
    g = gramian / scale
    max_iter = 50 * k + 50 if max_iter is None else max_iter
    first = int(g.diagonal().argmin())
    support = [first]
    lam = np.zeros(k)
    lam[first] = 1.0
    for _ in range(max_iter):
        g_lam = g @ lam
        j = int(g_lam.argmin())
        # Optimality: every vertex p_j satisfies x.p_j >= x.x (up to tol).
        if lam @ g_lam - g_lam[j] <= tol or j in support:
            return lam
        support.append(j)
        for _ in range(k + 1):  # minor cycle: each pass drops at least one vertex
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
    raise AggregationError(f"min-norm solver did not converge in {max_iter} iterations (K={k})")


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
