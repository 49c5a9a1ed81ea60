"""IMTL-L: impartial loss balancing with learned scales.

L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao, W. Zhang, "Towards Impartial
Multi-task Learning", ICLR 2021, the loss balance IMTL-L: min over s of e^s L - s per task.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_cost.aggregators.base import LossWeighting, check_losses

__all__ = ["IMTLL"]


class IMTLL(LossWeighting):
    r"""IMTL-L: ``objective = sum_k exp(s_k) L_k - s_k`` with one learned scale ``s_k`` per task.

    ``d objective / d L_k = exp(s_k)``. For fixed losses the objective is minimised in ``s_k`` at
    ``exp(s_k) L_k = 1``, i.e. ``s_k = -log L_k``: at that point every scaled loss
    ``exp(s_k) L_k`` equals 1, which is the paper's "impartial" balance of the loss scales. (Unlike
    UW's ``exp(-s_k) L_k + s_k``, the regulariser does not push the weights down as a loss grows
    large; the stationary weights are the same ``1 / L_k``.) For losses that may be negative the
    paper transforms them first; here they are used as given.

    .. important::
        ``s`` is an :class:`~torch.nn.Parameter` trained by the **same optimizer as the network**:
        the optimizer must include this module's parameters. That happens automatically when the
        method is a submodule (attribute) of the LightningModule and ``configure_optimizers``
        passes ``self.parameters()``; with hand-built parameter groups add ``method.parameters()``
        (preferably with ``weight_decay=0``, which would pull ``s`` towards 0).

    Args:
        num_tasks: ``K`` (required: the parameters must exist before the optimizer is built).
        init_s: initial ``s_k`` (0: weights 1, as in the paper).
    """

    def __init__(self, num_tasks: int, init_s: float = 0.0) -> None:
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
            raise TypeError(f"num_tasks must be an int, got {type(num_tasks).__name__}")
        if num_tasks < 2:
            raise ValueError(f"num_tasks must be >= 2, got {num_tasks}")
        if isinstance(init_s, bool) or not isinstance(init_s, (int, float)):
            raise TypeError(f"init_s must be a float, got {type(init_s).__name__}")
        if not torch.isfinite(torch.tensor(float(init_s))):
            raise ValueError(f"init_s must be finite, got {init_s}")
        self.s = nn.Parameter(torch.full((num_tasks,), float(init_s)))

    @property
    def num_tasks(self) -> int:
        return self.s.numel()

    def _check(self, losses: Tensor) -> None:
        check_losses(losses)
        if losses.shape[0] != self.num_tasks:
            raise ValueError(f"IMTLL was built for {self.num_tasks} tasks but got {losses.shape[0]} losses")

    def forward(self, losses: Tensor) -> Tensor:
        self._check(losses)
        s = self.s.to(losses.device)
        return (torch.exp(s) * losses - s).sum()

    def loss_weights(self, losses: Tensor) -> Tensor:
        """``d/dL_k sum_j (exp(s_j) L_j - s_j) = exp(s_k)``."""
        self._check(losses)
        return torch.exp(self.s.detach()).to(device=losses.device, dtype=losses.dtype)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}"
