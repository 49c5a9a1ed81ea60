"""Scale-invariant loss (SI): the sum of the logarithms of the task losses.

A baseline of the paper's Sec. 5 ("Scale-Invariant (SI)"; as used in the
Nash-MTL / FAMO benchmarks): ``objective = sum_k log L_k``. Its gradient is
``sum_k g_k / L_k``, so rescaling any task loss by a constant ``c_k > 0`` does
not change the update (``log(c L) = log c + log L``).
"""

from __future__ import annotations

from torch import Tensor

from lightning_cost.aggregators.base import LossWeighting, check_positive_losses

__all__ = ["ScaleInvariant"]


class ScaleInvariant(LossWeighting):
    r"""Scale-invariant objective ``sum_k log L_k``.

    ``d objective / d L_k = 1 / L_k``: each task's gradient is weighted by the
    inverse of its current loss. Requires strictly positive losses (a
    :class:`ValueError` is raised otherwise, since ``log`` is undefined there).
    """

    @staticmethod
    def _check(losses: Tensor) -> None:
        check_positive_losses(losses, "ScaleInvariant", "it takes their log")

    def forward(self, losses: Tensor) -> Tensor:
        self._check(losses)
        return losses.log().sum()

    def loss_weights(self, losses: Tensor) -> Tensor:
        """``d/dL_k sum_j log L_j = 1 / L_k``."""
        self._check(losses)
        return 1.0 / losses.detach()
