"""Uncertainty weighting (UW), Kendall, Gal & Cipolla 2018.

A. Kendall, Y. Gal, R. Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
Losses for Scene Geometry and Semantics", CVPR 2018 (ref. [13] of the COST
paper), Sec. 3.2, eq. (7) (and eq. (10) for classification): with homoscedastic
task noise ``sigma_k`` the objective is ``sum_k L_k / (2 sigma_k^2) + log sigma_k``;
for numerical stability the network learns ``s_k := log sigma_k^2`` instead
(Sec. 3.2). We use

    objective = sum_k exp(-s_k) L_k + s_k,

which is exactly twice eq. (7) written in ``s_k``: same minimisers, same relative
task weights ``exp(-s_k)``. (Implementations that keep the factor 1/2 give the
network half the gradient; with Adam this makes little difference.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_cost.aggregators.base import LossWeighting, check_losses

__all__ = ["UncertaintyWeighting"]


class UncertaintyWeighting(LossWeighting):
    r"""Learned uncertainty weights: ``sum_k exp(-s_k) L_k + s_k`` with ``s_k = log sigma_k^2``.

    ``d objective / d L_k = exp(-s_k)``, and for fixed losses the optimum over
    ``s_k`` is ``s_k = log L_k`` (``exp(s_k) = L_k``): tasks with a large loss get
    a small weight.

    .. important::
        ``s`` is an :class:`~torch.nn.Parameter` trained by the **same optimizer
        as the network**: the optimizer must include this module's parameters.
        That happens automatically when the method is a submodule (attribute) of
        the LightningModule and ``configure_optimizers`` passes
        ``self.parameters()``; if you build parameter groups by hand, add
        ``method.parameters()`` (ideally with ``weight_decay=0``: weight decay
        pulls ``s`` towards 0, i.e. the weights towards 1). Under DDP its gradient
        is all-reduced like any other parameter's.

    Args:
        num_tasks: ``K`` (required: the parameters must exist before the
            optimizer is built).
        init_s: initial ``s_k`` (paper / benchmarks: 0, i.e. ``sigma_k = 1``,
            weights 1).
    """

    def __init__(self, num_tasks: int, init_s: float = 0.0) -> None:
        super().__init__()
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 2:
            raise ValueError(f"num_tasks must be an int >= 2, got {num_tasks!r}")
        self.s = nn.Parameter(torch.full((num_tasks,), float(init_s)))

    @property
    def num_tasks(self) -> int:
        return self.s.numel()

    def task_weights(self, losses: Tensor | None = None) -> Tensor:
        """The current weights ``exp(-s_k)`` (detached)."""
        w = torch.exp(-self.s.detach())
        return w if losses is None else w.to(device=losses.device, dtype=losses.dtype)

    def _check(self, losses: Tensor) -> None:
        check_losses(losses)
        if losses.shape[0] != self.num_tasks:
            raise ValueError(
                f"UncertaintyWeighting was built for {self.num_tasks} tasks but got {losses.shape[0]} losses"
            )

    def forward(self, losses: Tensor) -> Tensor:
        self._check(losses)
        s = self.s.to(losses.device)
        return (torch.exp(-s) * losses + s).sum()

    def loss_weights(self, losses: Tensor) -> Tensor:
        """``d/dL_k sum_j (exp(-s_j) L_j + s_j) = exp(-s_k)``."""
        self._check(losses)
        return self.task_weights(losses)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}"
