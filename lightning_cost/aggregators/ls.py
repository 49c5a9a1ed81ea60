"""Linear scalarisation (LS): the plain (weighted) sum of the task losses.

The first baseline of the paper's Sec. 5 ("Linear Scalarization (LS)"), also
called *equal weighting* (EW): ``objective = sum_k w_k L_k`` with ``w_k = 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_cost.aggregators.base import LossWeighting, check_losses

__all__ = ["LinearScalarization"]


class LinearScalarization(LossWeighting):
    r"""Linear scalarisation ``sum_k w_k L_k`` with fixed weights.

    With the default ``weights=None`` every weight is 1 (the paper's LS, equal
    weighting); the gradient of the objective is then the sum of the task
    gradients, ``d = sum_k g_k``.

    Args:
        weights: optional fixed non-negative weight per task (length ``K``).
            When given, the number of losses passed to :meth:`forward` must be
            ``len(weights)``.
    """

    weights: Tensor

    def __init__(self, weights: Sequence[float] | Tensor | None = None) -> None:
        super().__init__()
        if weights is None:
            w = torch.empty(0)
        else:
            w = torch.as_tensor(weights, dtype=torch.get_default_dtype()).detach().clone()
            if w.ndim != 1 or w.numel() < 2:
                raise ValueError(f"weights must be a sequence of K >= 2 numbers, got shape {tuple(w.shape)}")
            if not torch.isfinite(w).all() or (w < 0).any():
                raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
        # An empty buffer means "all ones" (the number of tasks is then free).
        self.register_buffer("weights", w)

    def task_weights(self, losses: Tensor) -> Tensor:
        """The weight vector applied to ``losses`` (ones unless fixed weights were given)."""
        return self._weights_for(losses, copy=False)

    def _weights_for(self, losses: Tensor, copy: bool) -> Tensor:
        check_losses(losses)
        fixed = self.weights
        if fixed.numel() == 0:
            return torch.ones_like(losses)  # a new tensor, never requiring grad
        if fixed.numel() != losses.shape[0]:
            raise ValueError(f"got {losses.shape[0]} losses but {fixed.numel()} fixed weights")
        return fixed.to(device=losses.device, dtype=losses.dtype, copy=copy)

    def forward(self, losses: Tensor) -> Tensor:
        return (self.task_weights(losses) * losses).sum()

    def loss_weights(self, losses: Tensor) -> Tensor:
        """``d/dL_k sum_j w_j L_j = w_k``: :meth:`task_weights`, as a new tensor (never the buffer)."""
        return self._weights_for(losses, copy=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # Allow loading fixed weights into an instance built without them (and vice versa).
        key = prefix + "weights"
        if key in state_dict:
            self.weights = torch.empty_like(state_dict[key], device=self.weights.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return "weights=ones" if self.weights.numel() == 0 else f"weights={self.weights.tolist()}"
