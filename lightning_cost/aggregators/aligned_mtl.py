"""Aligned-MTL: the task gradients made orthogonal and of equal length before they are combined
(Senushkin et al., CVPR 2023)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from lightning_cost.aggregators._common import gramian_as_float64, weights_like
from lightning_cost.aggregators.base import GramianAggregator

__all__ = ["AlignedMTL"]

_SCALES = ("min", "median", "mean")


class AlignedMTL(GramianAggregator):
    """Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, CVPR 2023, "Independent Component
    Alignment for Multi-Task Learning", Algorithm 1: the balance transformation of the gradient
    matrix to a condition number of 1).

    With ``G = J J^T = V diag(lambda) V^T`` over its ``r`` non-zero eigenvalues, the aligned
    gradients are the rows of ``B J`` with ``B = s V diag(lambda)^(-1/2) V^T``: on the span of the
    gradients they are orthogonal with equal norms ``s`` (``B J J^T B = s^2 V V^T``). The update
    is their weighted sum ``d = J^T B w`` (``w = 1/K`` each, or ``preference``). ``s`` is the
    square root of the smallest non-zero eigenvalue (``scale="min"``, the paper's), of the median
    or of the mean one.

    Args:
        preference: the task weights ``w`` (positive, one per task), or ``None`` for ``1/K``.
        scale: ``"min"``, ``"median"`` or ``"mean"``.

    Degenerate input: eigenvalues under ``K * eps * lambda_max`` count as zero (the gradients'
    span has rank ``r``); an all-zero Jacobian gives ``d = 0``. A non-finite Gramian raises
    ``ValueError``. The weights are unchanged under ``J -> cJ`` (``s`` and ``lambda^(1/2)`` both scale
    as ``c``). ``"median"`` of an even number of eigenvalues is the mean of the middle two (TorchJD
    takes the lower one).
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, preference: list[float] | None = None, scale: str = "min") -> None:
        super().__init__()
        if scale not in _SCALES:
            raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
        if preference is not None:
            preference = [float(p) for p in preference]
            if not preference or not all(np.isfinite(p) and p > 0 for p in preference):
                raise ValueError(f"preference must be positive finite task weights, got {preference}")
        self.preference = preference
        self.scale = scale

    def task_weights(self, k: int) -> np.ndarray:
        if self.preference is None:
            return np.full(k, 1.0 / k)
        if len(self.preference) != k:
            raise ValueError(f"preference has {len(self.preference)} weights for {k} tasks")
        return np.asarray(self.preference)

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        w = self.task_weights(g.shape[0])
        lam, v = np.linalg.eigh(g)
        keep = lam > max(float(lam.max()), 0.0) * g.shape[0] * np.finfo(np.float64).eps
        if not keep.any():  # every gradient is zero: d = J^T w = 0 whatever w is
            return weights_like(w, gramian)
        lam, v = lam[keep], v[:, keep]
        s = np.sqrt({"min": lam.min(), "median": np.median(lam), "mean": lam.mean()}[self.scale])
        balance = (v * (s / np.sqrt(lam))) @ v.T  # B = s V diag(lambda)^(-1/2) V^T
        return weights_like(balance @ w, gramian)

    def extra_repr(self) -> str:
        return f"preference={self.preference}, scale={self.scale!r}"
