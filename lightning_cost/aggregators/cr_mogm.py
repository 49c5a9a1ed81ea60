"""CR-MOGM: another Gramian method's weights smoothed by a moving average across steps (Zhou et al., 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_cost.aggregators._common import gramian_as_float64
from lightning_cost.aggregators.base import GramianAggregator

__all__ = ["CRMOGM"]


class CRMOGM(GramianAggregator):
    """Correlation-reduced multi-objective gradient manipulation (Zhou, Zhang, Jiang, Dong, Zhang &
    Liu, NeurIPS 2022, "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and
    Beyond", Sec. 4: the weights of a gradient-manipulation method averaged over iterations).

    With ``w_hat_t`` the wrapped method's weights at step ``t``, the update is ``d = J^T w_t`` with
    ``w_t = alpha w_{t-1} + (1 - alpha) w_hat_t`` and ``w_0 = w_hat_1`` (the first step is the
    wrapped method's). Averaging the weights lowers the correlation between them and the batch's
    gradients, the bias that keeps stochastic MGDA from converging.

    Args:
        base: the wrapped Gramian method, a registry name (``"mgda"``, the paper's) or an instance.
        alpha: the weight on the previous weights, in ``[0, 1)`` (0: the wrapped method itself).

    The running weights are in the ``state_dict`` (the wrapped method's own state under
    ``base.``); they restart when the number of tasks changes. A non-finite Gramian raises
    ``ValueError``; the wrapped method's errors pass through.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, base: str | GramianAggregator = "mgda", alpha: float = 0.9) -> None:
        super().__init__()
        if isinstance(base, str):
            from lightning_cost.aggregators import build_aggregator  # the registry imports this module

            base = build_aggregator(base)  # type: ignore[assignment]  # its type is checked just below
        if not isinstance(base, GramianAggregator) or isinstance(base, CRMOGM):
            raise ValueError(f"base must be a Gramian method other than CR-MOGM, got {type(base).__name__}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.base = base
        self.alpha = float(alpha)
        self.running: Tensor | None = None

    def weights(self, gramian: Tensor) -> Tensor:
        if not self.base.validates_gramian:  # a built-in base validates G (shape, finite) itself
            gramian_as_float64(gramian)
        fresh = self.base.weights(gramian).to(torch.float64)
        if self.running is None or self.running.shape != fresh.shape:
            self.running = fresh.clone()
        else:
            self.running = self.alpha * self.running + (1.0 - self.alpha) * fresh.to(self.running.device)
        return self.running.to(dtype=gramian.dtype, device=gramian.device)

    def get_extra_state(self) -> Any:
        return {"running": None if self.running is None else self.running.clone()}

    def set_extra_state(self, state: Any) -> None:
        self.running = state["running"]

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"
