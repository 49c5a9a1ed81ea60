"""Trimmed mean: the coordinate-wise mean of the task gradients without their extremes.

D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018, Definition 2 (the coordinate-wise trimmed mean).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_cost.aggregators.base import Aggregator, check_jacobian

__all__ = ["TrimmedMean"]


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean of the rows of ``J`` (``K x P``).

    In every coordinate (column) the ``trim_number`` largest and the ``trim_number`` smallest of
    the ``K`` task values are dropped and the ``K - 2 trim_number`` that remain are averaged. A task
    whose gradient is an outlier in a coordinate has no say there, so up to ``trim_number``
    arbitrary gradients cannot move the update far (Yin et al.'s Byzantine robustness); with
    ``trim_number=0`` it is the mean of the gradients.

    It is not a Gramian method: each coordinate keeps its own subset of tasks, so the update is not
    ``J^T w`` for any one ``w``. It follows a permutation of the tasks, and ``J -> cJ`` (``c > 0``)
    scales it by ``c``.

    Args:
        trim_number: how many values are dropped at each end of every column (an int ``>= 0``;
            default 1). Needs ``K > 2 trim_number`` tasks.

    A non-finite ``J`` raises ``ValueError`` naming its rows; ties in a column do not matter (equal
    values are interchangeable).
    """

    def __init__(self, trim_number: int = 1) -> None:
        super().__init__()
        if isinstance(trim_number, bool) or not isinstance(trim_number, int):
            raise TypeError(f"trim_number must be an int, got {type(trim_number).__name__}")
        if trim_number < 0:
            raise ValueError(f"trim_number must be >= 0, got {trim_number}")
        self.trim_number = trim_number

    def aggregate(self, jacobian: Tensor) -> Tensor:
        check_jacobian(jacobian)
        k = jacobian.shape[0]
        kept = k - 2 * self.trim_number
        if kept < 1:
            raise ValueError(f"TrimmedMean with trim_number={self.trim_number} drops {2 * self.trim_number} "
                             f"values per coordinate and needs more than that many tasks, got K={k}")
        if self.trim_number == 0:
            return jacobian.mean(dim=0)
        ordered = torch.sort(jacobian, dim=0).values
        return ordered[self.trim_number : self.trim_number + kept].mean(dim=0)

    def extra_repr(self) -> str:
        return f"trim_number={self.trim_number}"
