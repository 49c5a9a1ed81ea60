"""PCGrad: projecting conflicting gradients (Yu et al., 2020)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_cost.aggregators.base import GramianAggregator
from lightning_cost.aggregators.mgda import gramian_as_float64

__all__ = ["PCGrad", "seeded_generator"]


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``, or non-deterministically when ``None``."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


class PCGrad(GramianAggregator):
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
    gradients.

    Args:
        seed: seed of the ``torch.Generator`` that draws the task orders (one
            ``torch.randperm(K)`` per task ``i = 0..K-1``, in that order, per call). Give
            every DDP rank the same seed so that all ranks use the same orders. ``None``
            seeds it non-deterministically. The generator state is saved in the module's
            ``state_dict`` (extra state), so a resumed run continues the same sequence.

    Degenerate input: the projection divides by ``||g_j||^2`` only when
    ``g_i^PC . g_j < 0``, which is impossible for a zero ``g_j``; a zero task gradient
    therefore never conflicts and nothing divides by zero. Gradients that do not conflict
    pairwise give ``d = sum_i g_i``.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed
        self.generator = seeded_generator(seed)

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        k = g.shape[0]
        total = np.zeros(k)
        for i in range(k):
            c = np.zeros(k)
            c[i] = 1.0
            for j in torch.randperm(k, generator=self.generator).tolist():
                if j == i:
                    continue
                dot = float(c @ g[:, j])  # g_i^PC . g_j
                if dot < 0.0:
                    c[j] -= dot / g[j, j]
            total += c
        return torch.as_tensor(total, dtype=gramian.dtype, device=gramian.device)

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"])

    def extra_repr(self) -> str:
        return f"seed={self.seed}"
