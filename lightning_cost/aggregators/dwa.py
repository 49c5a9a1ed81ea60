"""Dynamic Weight Average (DWA), Liu, Johns & Davison 2019.

S. Liu, E. Johns, A. J. Davison, "End-to-End Multi-Task Learning with
Attention" (MTAN), CVPR 2019 (ref. [19] of the COST paper), Sec. 3, "Dynamic
Weight Average":

    lambda_k(t) = K exp(w_k(t-1) / T) / sum_i exp(w_i(t-1) / T),
    w_k(t-1)    = L_k(t-1) / L_k(t-2),

where ``L_k(t)`` is the *average* loss of task ``k`` over the iterations of epoch
``t``, ``T = 2`` and ``w_k(t) = 1`` (so ``lambda_k = 1``) for the first two epochs.
The objective is ``sum_k lambda_k(t) L_k``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_cost.aggregators._common import ensure_task_buffers, size_task_buffers_for
from lightning_cost.aggregators.base import LossWeighting, check_losses

__all__ = ["DWA"]

_TASK_BUFFERS = ("loss_sum", "history")


class DWA(LossWeighting):
    r"""Dynamic Weight Average: weights from the ratio of the last two epoch-average losses.

    Bookkeeping (all in buffers, so a checkpoint resumes mid-epoch exactly):

    * :meth:`observe` (once per optimizer step, with the globally averaged losses)
      adds the losses to ``loss_sum`` and counts the step in ``num_steps``;
    * :meth:`on_epoch_end` turns the sum into the epoch average and rolls it into
      ``history`` (row 0: ``L(t-2)``, row 1: ``L(t-1)``), counting ``num_epochs``.
      An epoch in which nothing was observed is not rolled in.

    The weights are constant within an epoch: 1 while fewer than two epochs
    have been completed, then ``K softmax(w / T)`` with ``w = L(t-1) / L(t-2)``
    (they sum to ``K``). The ratio needs positive epoch-average losses; a
    non-positive one raises :class:`ValueError`.

    Args:
        num_tasks: ``K``; when ``None`` it is taken from the first losses seen.
        T: the temperature (paper default 2). Large ``T`` -> weights close to 1.
    """

    loss_sum: Tensor
    num_steps: Tensor
    history: Tensor
    num_epochs: Tensor

    def __init__(self, num_tasks: int | None = None, T: float = 2.0) -> None:
        super().__init__()
        if num_tasks is not None and (not isinstance(num_tasks, int) or num_tasks < 2):
            raise ValueError(f"num_tasks must be an int >= 2, got {num_tasks!r}")
        if not T > 0:
            raise ValueError(f"the temperature T must be positive, got {T}")
        self.T = float(T)
        self.register_buffer("loss_sum", torch.zeros(0))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("history", torch.zeros(2, 0))
        self.register_buffer("num_epochs", torch.zeros((), dtype=torch.long))
        if num_tasks is not None:
            self._ensure(num_tasks)

    @property
    def num_tasks(self) -> int | None:
        return self.loss_sum.numel() or None

    def _ensure(self, k: int) -> None:
        ensure_task_buffers(self, k, {"loss_sum": (k,), "history": (2, k)}, "DWA")

    def task_weights(self, losses: Tensor | None = None) -> Tensor:
        """``lambda(t)`` for the current epoch (ones before two epochs have been completed)."""
        if losses is not None:
            check_losses(losses)
            self._ensure(losses.shape[0])
        k = self.loss_sum.numel()
        if k == 0:
            raise ValueError("DWA does not know the number of tasks yet: pass num_tasks or some losses")
        if int(self.num_epochs) < 2:
            w = torch.ones(k, device=self.history.device)
        else:
            prev2, prev1 = self.history[0], self.history[1]
            if not all(v > 0 for row in self.history.tolist() for v in row):  # 2 x K values, one copy
                raise ValueError(
                    f"DWA needs positive epoch-average losses, got L(t-2)={prev2.tolist()}, L(t-1)={prev1.tolist()}"
                )
            ratio = prev1 / prev2
            w = k * torch.softmax(ratio / self.T, dim=0)
        if losses is not None:
            w = w.to(device=losses.device, dtype=losses.dtype)
        return w

    def forward(self, losses: Tensor) -> Tensor:
        return (self.task_weights(losses) * losses).sum()

    def loss_weights(self, losses: Tensor) -> Tensor:
        """``d/dL_k sum_j lambda_j(t) L_j = lambda_k(t)`` (constant within the epoch)."""
        return self.task_weights(losses.detach())

    def observe(self, losses: Tensor) -> None:
        """Accumulate one optimizer step's (globally averaged) losses into the epoch average."""
        check_losses(losses)
        self._ensure(losses.shape[0])
        # in place (add_): the same update as +=, without re-registering the buffers
        self.loss_sum.add_(losses.detach().to(self.loss_sum))
        self.num_steps.add_(1)

    def on_epoch_end(self) -> None:
        """Roll this epoch's average loss into the history and reset the accumulator."""
        if int(self.num_steps) == 0:
            return
        avg = self.loss_sum / self.num_steps
        self.history[0].copy_(self.history[1])
        self.history[1].copy_(avg)
        self.num_epochs.add_(1)
        self.loss_sum.zero_()
        self.num_steps.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        size_task_buffers_for(self, state_dict, prefix, _TASK_BUFFERS)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, T={self.T}"
