"""Geometric loss strategy (GLS): the geometric mean of the task losses.

S. Chennupati, G. Sistu, S. Yogamani, S. A. Rawashdeh, "MultiNet++: Multi-Stream Feature
Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019, the
geometric loss L = (prod_k L_k)^(1/K).
"""

from __future__ import annotations

from torch import Tensor

from lightning_cost.aggregators.base import LossWeighting, check_positive_losses

__all__ = ["GLS"]


class GLS(LossWeighting):
    r"""Geometric loss strategy: ``objective = (prod_k L_k)^(1/K)``.

    ``d objective / d L_k = (prod_j L_j)^(1/K) / (K L_k)``: each task's gradient is weighted by the
    inverse of its loss, as in SI (``sum_k log L_k``, whose logarithm GLS's objective is, over
    ``K``), times the current geometric mean, so the step size follows the losses' common scale
    instead of blowing up as they shrink. Rescaling one loss by ``c > 0`` rescales the whole
    objective by ``c^(1/K)`` and leaves the relative weights unchanged.

    The objective is computed as ``exp(mean_k log L_k)`` (no overflow or underflow of the product
    for many tasks). It needs strictly positive losses; others raise :class:`ValueError`.
    """

    @staticmethod
    def _check(losses: Tensor) -> None:
        check_positive_losses(losses, "GLS", "a geometric mean of logs")

    def forward(self, losses: Tensor) -> Tensor:
        self._check(losses)
        return losses.log().mean().exp()

    def loss_weights(self, losses: Tensor) -> Tensor:
        """``d/dL_k (prod_j L_j)^(1/K) = (prod_j L_j)^(1/K) / (K L_k)``."""
        self._check(losses)
        x = losses.detach()
        return x.log().mean().exp() / (x.shape[0] * x)
