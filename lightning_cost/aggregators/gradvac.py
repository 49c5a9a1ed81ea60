"""GradVac: each task gradient turned toward every other until their cosine reaches its running
target (Wang et al., 2021)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_cost.aggregators._common import SeededDraws, checkpoint_safe, gramian_as_float64, weights_like
from lightning_cost.aggregators.base import GramianAggregator

__all__ = ["GradVac"]


class GradVac(SeededDraws, GramianAggregator):
    """Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021, "Gradient Vaccine: Investigating
    and Improving Multi-task Optimization in Massively Multilingual Models", Algorithm 1, on the
    whole shared parameter vector).

    For each task ``i``, from ``g_i' = g_i``, the other tasks ``j`` are visited in a random order;
    with ``phi = cos(g_i', g_j)`` and the running target ``phi_hat_ij``, when ``phi < phi_hat_ij``::

        g_i' <- g_i' + ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                       / (||g_j|| sqrt(1 - phi_hat^2)) g_j

    which sets ``cos(g_i', g_j)`` to ``phi_hat`` exactly; then
    ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi``. ``d = sum_i g_i'``. With the targets at 0
    (the first call) this is PCGrad's projection. As in PCGrad, every ``g_i'`` is ``J^T c_i`` and
    the procedure runs on the Gramian.

    Args:
        beta: the targets' EMA rate in ``[0, 1]`` (0.5, LibMTL's and TorchJD's default).
        seed: seed of the generator that draws the orders (one ``torch.randperm(K - 1)`` over the
            other tasks per task ``i``, per call); ``None``: non-deterministic. With seed ``s`` the
            orders are TorchJD's after ``torch.manual_seed(s)``.

    The targets (``K x K``) and the generator are in the ``state_dict``; the targets restart at 0
    when the number of tasks changes. Degenerate input: a zero ``g_i'`` or ``g_j`` has no cosine
    (``phi = 0``, no correction); a target of exactly 1 admits no finite correction (none is made).
    Unlike the peers' code no ``eps`` enters the denominators, so the weights are unchanged under
    ``J -> cJ``. A non-finite Gramian raises ``ValueError``.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, beta: float = 0.5, seed: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self._seed(seed)
        self.targets = np.zeros((0, 0))

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        k = g.shape[0]
        if self.targets.shape != (k, k):
            self.targets = np.zeros((k, k))
        total = np.zeros(k)
        for i in range(k):
            others = [j for j in range(k) if j != i]
            order = [others[n] for n in torch.randperm(k - 1, generator=self.generator).tolist()]
            total += self._vaccinate(g, i, order)
        return weights_like(total, gramian)

    def _vaccinate(self, g: np.ndarray, i: int, order: list[int]) -> np.ndarray:
        """The coefficients ``c_i`` of ``g_i'`` over the original gradients; updates the targets."""
        c = np.zeros(g.shape[0])
        c[i] = 1.0
        dots = g[i].copy()  # g_i' . g_j for every j
        for j in order:
            norm_i, norm_j = math.sqrt(max(float(c @ dots), 0.0)), math.sqrt(g[j, j])
            phi = float(dots[j]) / (norm_i * norm_j) if norm_i > 0.0 and norm_j > 0.0 else 0.0
            target = float(self.targets[i, j])
            room = math.sqrt(max(1.0 - target * target, 0.0))
            if phi < target and room > 0.0 and norm_j > 0.0:
                w = norm_i * (target * math.sqrt(max(1.0 - phi * phi, 0.0)) - phi * room) / (norm_j * room)
                c[j] += w
                dots += w * g[j]
            self.targets[i, j] = (1.0 - self.beta) * target + self.beta * phi
        return c

    def get_extra_state(self) -> Any:
        return checkpoint_safe({**super().get_extra_state(), "targets": self.targets})

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.targets = np.array(state["targets"], dtype=np.float64)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, seed={self.seed}"
