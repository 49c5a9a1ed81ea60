"""ConFIG: the conflict-free direction of equal cosine to every task gradient (Liu et al., 2025)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_cost.aggregators._common import gramian_as_float64, weights_like
from lightning_cost.aggregators.base import GramianAggregator

__all__ = ["ConFIG"]


class ConFIG(GramianAggregator):
    """ConFIG (Liu, Chu & Thuerey, ICLR 2025, "ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks", Eq. 2: the conflict-free update; the paper's momentum variant
    M-ConFIG is not included).

    With ``U`` the matrix of unit gradients (rows ``u_i = g_i / ||g_i||``), the direction
    ``v = pinv(U) 1`` has the same inner product with every ``u_i``; the update is its unit vector
    scaled by the sum of the projections of the gradients on it::

        d = (sum_i g_i . v_hat) v_hat,    v_hat = v / ||v||

    A function of the Gramian: ``pinv(U) = U^T (U U^T)^+`` and ``U U^T = C``, the cosine matrix
    ``D^-1 G D^-1`` (``D = diag ||g_i||``), so ``v = J^T b`` with ``b = D^-1 C^+ 1`` and
    ``d = J^T w``, ``w = b (1^T G b) / (b^T G b)``. ``C^+`` comes from ``C``'s eigendecomposition
    (float64), eigenvalues up to ``rcond`` times the largest treated as zero. When the unit
    gradients are linearly independent (``K <= P``), ``d`` has equal positive cosine to every
    ``g_i``; otherwise the pseudo-inverse gives the least-squares compromise, as in the paper.
    Weights are unchanged under ``J -> cJ``; permuting the tasks permutes them.

    Args:
        rcond: relative cut-off of ``C``'s eigenvalues; ``None`` (default): ``K`` times the machine
            epsilon of the Gramian's dtype (what rounding of ``G`` can produce). ``C``'s eigenvalues
            are the squared singular values of ``U``, so this cut is finer than ``pinv(U)``'s.

    Degenerate input: a zero task gradient has no unit direction; as in the authors' code its
    row of ``U`` is zero, so it gets weight 0 and the others keep equal cosines. An all-zero
    Jacobian gives ``d = 0``. A non-finite Gramian raises ``ValueError``.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, rcond: float | None = None) -> None:
        super().__init__()
        if rcond is not None and not 0.0 <= rcond < 1.0:
            raise ValueError(f"rcond must be None or in [0, 1), got {rcond}")
        self.rcond = rcond

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        k = g.shape[0]
        norms = np.sqrt(np.maximum(g.diagonal(), 0.0))
        inv = np.divide(1.0, norms, out=np.zeros(k), where=norms > 0.0)  # a zero gradient: zero unit row
        vals, vecs = np.linalg.eigh(g * np.outer(inv, inv))
        rcond = k * torch.finfo(gramian.dtype).eps if self.rcond is None else self.rcond
        keep = vals > rcond * max(float(vals.max()), 0.0)
        a = vecs[:, keep] @ ((vecs[:, keep].T @ np.ones(k)) / vals[keep])  # C^+ 1
        b = a * inv
        norm_sq = float(b @ g @ b)  # ||v||^2
        w = b * (float(np.ones(k) @ g @ b) / norm_sq) if norm_sq > 0.0 else np.zeros(k)
        return weights_like(w, gramian)

    def extra_repr(self) -> str:
        return f"rcond={self.rcond}"
