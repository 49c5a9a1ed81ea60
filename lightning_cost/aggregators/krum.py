"""Krum: the mean of the task gradients that lie closest to their neighbours (Blanchard et al., 2017)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from lightning_cost.aggregators._common import gramian_as_float64, weights_like
from lightning_cost.aggregators.base import GramianAggregator

__all__ = ["Krum"]


class Krum(GramianAggregator):
    """Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, NeurIPS 2017, "Machine
    Learning with Adversaries: Byzantine Tolerant Gradient Descent", Sec. 4; TorchJD's ``Krum``).

    Each gradient ``g_i`` is scored by the sum of its distances to its ``K - f - 2`` nearest other
    gradients (``f = outliers``), the distances read off the Gramian,
    ``||g_i - g_j||^2 = G_ii + G_jj - 2 G_ij``; ``d`` is the mean of the ``selected`` gradients with
    the lowest scores (``selected=1``: Krum). It tolerates up to ``f`` arbitrary gradients; for
    multi-task learning it drops the tasks whose gradients are the odd ones out.

    Args:
        outliers: ``f``, the number of gradients that may be arbitrary (needs ``K >= f + 3``).
        selected: how many gradients are averaged (``1 <= selected <= K``).

    Ties in the scores go to the lower task index; with one neighbour (``K = f + 3``) the two
    gradients of the closest pair always tie. A non-finite Gramian raises ``ValueError``.
    The choice is unchanged under ``J -> cJ`` (``c > 0``) and follows a permutation of the tasks
    (up to ties).
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, outliers: int = 0, selected: int = 1) -> None:
        super().__init__()
        for name, value, low in (("outliers", outliers, 0), ("selected", selected, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.outliers = outliers
        self.selected = selected

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        k = g.shape[0]
        if k < self.outliers + 3 or k < self.selected:
            raise ValueError(f"Krum with outliers={self.outliers}, selected={self.selected} needs at least "
                             f"{max(self.outliers + 3, self.selected)} tasks, got {k}")
        sq = np.diag(g)
        dist = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2.0 * g, 0.0, None))
        np.fill_diagonal(dist, np.inf)  # a gradient is not its own neighbour
        scores = np.sort(dist, axis=1)[:, : k - self.outliers - 2].sum(axis=1)
        chosen = np.argsort(scores, kind="stable")[: self.selected]
        w = np.zeros(k)
        w[chosen] = 1.0 / self.selected
        return weights_like(w, gramian)

    def extra_repr(self) -> str:
        return f"outliers={self.outliers}, selected={self.selected}"
