"""Random: random positive weights on the task gradients, redrawn at every aggregation (Lin et al., 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_cost.aggregators._common import SeededDraws, gramian_as_float64, weights_like
from lightning_cost.aggregators.base import GramianAggregator

__all__ = ["Random"]


class Random(SeededDraws, GramianAggregator):
    """Random weighting of the gradients (Lin, Ye, Zhang & Tsang, TMLR 2022, "Reasonable
    Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning", Sec. 3, the
    random weighting of the task gradients (Algorithm 2); TorchJD's ``Random`` aggregator).

    At every call of :meth:`weights` it draws ``z ~ N(0, I_K)`` and returns ``w = softmax(z)``
    (positive, summing to 1), so ``d = J^T w``. The draw ignores ``G``; it is a Gramian method
    only so that it runs on either engine of the mixin.

    How it differs from :class:`~lightning_cost.aggregators.rlw.RLW`, which has the same
    distribution of ``w``: RLW is a loss weighting (``sum_k w_k L_k``, one backward, no Jacobian),
    draws once per optimizer step (``observe``), shares that draw across the micro-batches of an
    accumulated step, weights every task, and can rescale to sum ``K``. ``Random`` is an
    aggregator, as in TorchJD: it needs the Jacobian or the Gramian (``K`` gradients), draws anew
    at every aggregation (each micro-batch under gradient accumulation), and in the mixin a task
    whose shared gradient is zero is left out, the softmax drawn over the remaining tasks.

    Args:
        seed: seed of the private CPU ``torch.Generator`` (``K`` float64 normals per call, so the
            draws do not depend on the Gramian's dtype or device, and both engines draw the same);
            ``None`` seeds it from ``torch.initial_seed()``. Give every DDP rank the same seed. With a seed
            ``s``, the first draw equals TorchJD's ``Random`` on a float64 CPU ``J`` after
            ``torch.manual_seed(s)``. The generator state is saved in the ``state_dict``.

    Degenerate input: none: the weights are always positive and finite; a zero task gradient
    simply adds nothing to ``d``. A non-finite Gramian raises ``ValueError`` as for every method.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self._seed(seed)

    def weights(self, gramian: Tensor) -> Tensor:
        k = gramian_as_float64(gramian).shape[0]  # validates G (shape, finite) like every method
        z = torch.randn(k, generator=self.generator, dtype=torch.float64)
        return weights_like(torch.softmax(z, dim=0).numpy(), gramian)

    def extra_repr(self) -> str:
        return f"seed={self.seed}"
