"""PCGrad: projecting conflicting gradients (Yu et al., 2020)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_cost.aggregators._common import SeededDraws, gramian_as_float64, weights_like
from lightning_cost.aggregators.base import GramianAggregator

__all__ = ["PCGrad"]


#: Up to this many tasks the projections run on Python floats (numpy's per-call cost dominates there).
_SMALL_K = 8


def _project_small(g: list[list[float]], orders: list[list[int]]) -> np.ndarray:
    """``sum_i c_i`` of Algorithm 1 on a symmetric Gramian given as lists, task by task."""
    k = len(g)
    total = [0.0] * k
    for i in range(k):
        c = [0.0] * k  # the coefficients of g_i^PC over the original gradients
        c[i] = 1.0
        for j in orders[i]:
            gj = g[j]
            dot = sum(a * b for a, b in zip(c, gj, strict=True))  # g_i^PC . g_j
            if dot < 0.0:
                c[j] -= dot / gj[j]
        total = [t + x for t, x in zip(total, c, strict=True)]
    return np.array(total)


def _project_lockstep(g: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """``sum_i c_i`` of Algorithm 1, the ``K`` projection sequences advanced together."""
    k = g.shape[0]
    order = np.array(orders, dtype=np.intp).reshape(k, k - 1)
    c = np.eye(k)  # row i: the coefficients of g_i^PC over the original gradients
    rows = np.arange(k)
    diag = g.diagonal()
    for step in range(k - 1):
        js = order[:, step]
        dots = (c * g[js]).sum(axis=1)  # g_i^PC . g_{j_i} for every task i
        hit = dots < 0.0  # conflicting: project g_i^PC onto the normal plane of g_{j_i}
        if hit.any():
            c[rows[hit], js[hit]] -= dots[hit] / diag[js[hit]]
    return c.sum(axis=0)


class PCGrad(SeededDraws, GramianAggregator):
    """Projecting Conflicting Gradients (Yu, Kumar, Gupta, Levine, Hausman & Finn,
    NeurIPS 2020, "Gradient Surgery for Multi-Task Learning", Algorithm 1).

    For each task ``i``, starting from ``g_i^PC = g_i``, visit the other tasks ``j`` in a
    random order; whenever ``g_i^PC . g_j < 0``, project ``g_i^PC`` onto the normal plane
    of the (original) ``g_j``::

        g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j

    The update is the paper's ``d = sum_i g_i^PC``.

    Every ``g_i^PC`` is a linear combination ``J^T c_i`` of the original gradients, and
    its dot products are ``c_i^T G``, so the whole procedure runs on the Gramian (in
    float64) and the result is returned as weights ``w = sum_i c_i`` over the original
    gradients. For ``K > 8`` the ``K`` projection sequences, which are independent of each
    other, run in lock-step: step ``s`` applies the ``s``-th projection of every task at once
    (``K - 1`` vectorised numpy steps on the ``K x K`` matrix of the ``c_i`` instead of
    ``K (K - 1)`` scalar ones); for ``K <= 8`` plain Python floats are faster than numpy calls.

    Args:
        seed: seed of the ``torch.Generator`` that draws the task orders (one
            ``torch.randperm(K)`` per task ``i = 0..K-1``, in that order, per call). Give
            every DDP rank the same seed so that all ranks use the same orders. ``None``
            seeds it from ``torch.initial_seed()``. The generator state is saved in the module's
            ``state_dict`` (extra state), so a resumed run continues the same sequence.

    Degenerate input: the projection divides by ``||g_j||^2`` only when
    ``g_i^PC . g_j < 0``, which is impossible for a zero ``g_j``; a zero task gradient
    therefore never conflicts and nothing divides by zero. Gradients that do not conflict
    pairwise give ``d = sum_i g_i``.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._seed(seed)

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)  # exactly symmetric: row j of G is g_j's column
        k = g.shape[0]
        # orders[i]: the other tasks in the random order of task i (one randperm per task, i = 0..K-1)
        orders = [[j for j in torch.randperm(k, generator=self.generator).tolist() if j != i] for i in range(k)]
        total = _project_small(g.tolist(), orders) if k <= _SMALL_K else _project_lockstep(g, orders)
        return weights_like(total, gramian)

    def extra_repr(self) -> str:
        return f"seed={self.seed}"
