"""Scale-invariant loss (SI): the sum of the logarithms of the task losses.

A baseline of the paper's Sec. 5 ("Scale-Invariant (SI)"; as used in the
Nash-MTL / FAMO benchmarks): ``objective = sum_k log L_k``. Its gradient is
``sum_k g_k / L_k``, so rescaling any task loss by a constant ``c_k > 0`` does
not change the update (``log(c L) = log c + log L``).
"""

from __future__ import annotations

from torch import Tensor

from lightning_cost.aggregators.base import LossWeighting, check_losses

__all__ = ["ScaleInvariant"]


class ScaleInvariant(LossWeighting):
    r"""Scale-invariant objective ``sum_k log L_k``.

    ``d objective / d L_k = 1 / L_k``: each task's gradient is weighted by the
    inverse of its current loss. Requires strictly positive losses (a
    :class:`ValueError` is raised otherwise, since ``log`` is undefined there).
    """

    def forward(self, losses: Tensor) -> Tensor:
        check_losses(losses)
        if (losses <= 0).any():
            bad = (losses <= 0).nonzero().flatten().tolist()
            raise ValueError(
                f"ScaleInvariant needs strictly positive losses (it takes their log); "
                f"tasks {bad} have losses {losses.detach()[bad].tolist()}"
            )
        return losses.log().sum()
