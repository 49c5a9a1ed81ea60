"""STCH: smooth Tchebycheff scalarization of the (normalised, log) task losses.

X. Lin, X. Zhang, Z. Yang, F. Liu, Z. Wang, Q. Zhang, "Smooth Tchebycheff Scalarization for
Multi-Objective Optimization", ICML 2024: g_mu = mu log sum_k exp(w_k (f_k - z_k) / mu).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_cost.aggregators.base import LossWeighting, check_losses

__all__ = ["STCH"]


class STCH(LossWeighting):
    r"""Smooth Tchebycheff: ``objective = K mu log sum_k exp(w_k f_k / mu)``, ``f_k = log(L_k / n_k)``.

    A smooth, differentiable upper bound of ``K max_k w_k f_k`` (within ``K mu log K``; the
    Tchebycheff scalarization as ``mu -> 0``): the task furthest behind gets most of the weight,
    ``d objective / d L_k = K softmax(w f / mu)_k w_k / L_k``. As in the multi-task setting of the
    paper, the objectives are the logarithms of the losses normalised by ``n``, the mean losses of a
    warm-up epoch, with the ideal point ``z = 0`` there (a task at its warm-up level has ``f_k = 0``);
    the factor ``K`` keeps the weights on LS's scale (they sum to ``K`` for equal losses).

    Warm-up: epochs ``0 .. warmup_epoch`` (counted by :meth:`on_epoch_end`; an epoch in which
    nothing was observed is not counted) train ``sum_k log L_k`` (SI); the losses given to
    :meth:`observe` during epoch ``warmup_epoch`` are averaged into ``n``, and STCH starts with the
    next epoch. ``warmup_epoch=4`` (the default) gives five warm-up epochs. The epoch count, the
    running sum and ``n`` are in the ``state_dict``.

    Args:
        mu: the smoothing ``mu > 0`` (default 1.0).
        warmup_epoch: the warm-up epoch whose mean losses normalise (an int ``>= 0``, default 4).
        preference: the weights ``w_k > 0`` (default all 1), one per task.

    Losses must be strictly positive (their logarithm is taken); others raise ``ValueError``.
    """

    def __init__(self, mu: float = 1.0, warmup_epoch: int = 4, preference: Sequence[float] | None = None) -> None:
        super().__init__()
        if isinstance(mu, bool) or not isinstance(mu, (int, float)):
            raise TypeError(f"mu must be a float, got {type(mu).__name__}")
        if not (mu > 0.0 and math.isfinite(mu)):
            raise ValueError(f"mu must be positive and finite, got {mu}")
        if isinstance(warmup_epoch, bool) or not isinstance(warmup_epoch, int):
            raise TypeError(f"warmup_epoch must be an int, got {type(warmup_epoch).__name__}")
        if warmup_epoch < 0:
            raise ValueError(f"warmup_epoch must be >= 0, got {warmup_epoch}")
        if preference is not None:
            preference = [float(p) for p in preference]
            if len(preference) < 2 or not all(p > 0.0 and math.isfinite(p) for p in preference):
                raise ValueError(f"preference must hold at least 2 positive finite weights, got {preference}")
        self.mu, self.warmup_epoch, self.preference = float(mu), warmup_epoch, preference
        self.epochs = 0  # completed epochs in which something was observed
        self.steps_this_epoch = 0
        self.loss_sum: Tensor | None = None  # float64, on the CPU: the sum over epoch warmup_epoch
        self.norm: Tensor | None = None  # n, once the warm-up is over

    def _check(self, losses: Tensor) -> None:
        check_losses(losses)
        k = losses.shape[0]
        if self.preference is not None and len(self.preference) != k:
            raise ValueError(f"STCH has {len(self.preference)} preference weights but got {k} losses")
        if self.norm is not None and self.norm.numel() != k:
            raise ValueError(f"STCH was normalised for {self.norm.numel()} tasks but got {k} losses")
        values = losses.detach().tolist()
        bad = [i for i, v in enumerate(values) if not v > 0]
        if bad:
            raise ValueError(f"STCH needs strictly positive losses (it takes their log); "
                             f"tasks {bad} have losses {[values[i] for i in bad]}")

    def _scaled(self, losses: Tensor) -> Tensor:
        """``w_k log(L_k / n_k) / mu`` (after the warm-up)."""
        assert self.norm is not None
        f = (losses / self.norm.to(losses)).log()
        if self.preference is not None:
            f = f * torch.tensor(self.preference, dtype=torch.float64).to(losses)
        return f / self.mu

    def forward(self, losses: Tensor) -> Tensor:
        self._check(losses)
        if self.norm is None:
            return losses.log().sum()
        return losses.shape[0] * self.mu * torch.logsumexp(self._scaled(losses), dim=0)

    def loss_weights(self, losses: Tensor) -> Tensor:
        """Warm-up: ``1 / L_k``; then ``K softmax(w f / mu)_k w_k / L_k``."""
        self._check(losses)
        x = losses.detach()
        if self.norm is None:
            return 1.0 / x
        w = torch.softmax(self._scaled(x), dim=0) * x.shape[0] / x
        return w if self.preference is None else w * torch.tensor(self.preference, dtype=torch.float64).to(x)

    def observe(self, losses: Tensor) -> None:
        """Count the step; during epoch ``warmup_epoch`` add the losses to the normaliser's sum."""
        self._check(losses)
        self.steps_this_epoch += 1
        if self.norm is None and self.epochs == self.warmup_epoch:
            x = losses.detach().to(device="cpu", dtype=torch.float64)
            self.loss_sum = x.clone() if self.loss_sum is None else self.loss_sum + x

    def on_epoch_end(self) -> None:
        """Close the epoch; at the end of epoch ``warmup_epoch`` fix ``n`` to its mean losses."""
        if self.steps_this_epoch == 0:
            return
        if self.norm is None and self.epochs == self.warmup_epoch and self.loss_sum is not None:
            self.norm = self.loss_sum / self.steps_this_epoch
        self.epochs += 1
        self.steps_this_epoch = 0

    def get_extra_state(self) -> Any:
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return {"epochs": self.epochs, "steps_this_epoch": self.steps_this_epoch,
                "loss_sum": clone(self.loss_sum), "norm": clone(self.norm)}

    def set_extra_state(self, state: Any) -> None:
        self.epochs, self.steps_this_epoch = int(state["epochs"]), int(state["steps_this_epoch"])
        self.loss_sum = None if state["loss_sum"] is None else state["loss_sum"].clone()
        self.norm = None if state["norm"] is None else state["norm"].clone()

    def extra_repr(self) -> str:
        return f"mu={self.mu:g}, warmup_epoch={self.warmup_epoch}"
