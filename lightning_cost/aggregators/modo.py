"""MoDo: task weights that follow one projected gradient step per training step (Chen, Fernando, Ying &
Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
Conflict-Avoidance", NeurIPS 2023, Algorithm 1: the lambda update, Eq. (2.9a) of the JMLR 2024 version)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from lightning_cost.aggregators._common import (
    checkpoint_safe,
    gramian_as_float64,
    real_hparam,
    simplex_projection,
    weights_like,
)
from lightning_cost.aggregators.base import GramianAggregator

__all__ = ["MoDo"]


class MoDo(GramianAggregator):
    """Multi-objective gradient with Double sampling (Chen et al., NeurIPS 2023, Algorithm 1).

    MGDA solves ``min_{w in simplex} 1/2 ||J^T w||^2 + rho/2 ||w||^2`` to optimality at every step;
    MoDo only takes one projected gradient step on it from the previous step's weights::

        w_t = Proj_simplex(w_{t-1} - gamma (G w_{t-1} + rho w_{t-1})),    w_0 = 1/K,

    and moves the model along ``d = J^T w_t``. The weights change slowly, so they depend little on
    the current batch: the paper shows this trades conflict avoidance for a better generalisation
    and optimisation error than MGDA's. The weights are on the simplex, and depend on ``J`` only
    through ``G = J J^T``, so MoDo runs on the Gramian engine.

    Args:
        gamma: the step size of the weights' update, ``> 0`` (TorchJD's default 0.1). It is in the
            units of ``G``: the weights are not invariant under ``J -> cJ``.
        rho: the weights' ``l2`` regularisation, ``>= 0`` (TorchJD's default 0.1).

    The paper estimates ``G`` as ``J_1 J_2^T`` from two independent mini-batches, for an unbiased
    gradient of the weights' objective; here, as with every method of this library, ``G`` is the
    one batch's ``J J^T`` (the estimate is then biased, the property the paper's analysis needs is
    lost; the update is the one TorchJD's ``MoDoWeighting`` gives on ``J J^T``). The running weights
    (float64) are in the ``state_dict``; they restart at ``1/K`` when the number of tasks changes.
    A non-finite Gramian raises ``ValueError``.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__()
        self.gamma = real_hparam("gamma", gamma, 0.0, low_open=True)
        self.rho = real_hparam("rho", rho, 0.0)
        self.lam: np.ndarray | None = None

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        k = g.shape[0]
        lam = np.full(k, 1.0 / k) if self.lam is None or self.lam.shape != (k,) else self.lam
        self.lam = simplex_projection(lam - self.gamma * (g @ lam + self.rho * lam))
        return weights_like(self.lam.copy(), gramian)  # a copy: a caller may change the weights in place

    def get_extra_state(self) -> Any:
        return checkpoint_safe({"lam": self.lam})

    def set_extra_state(self, state: Any) -> None:
        self.lam = None if state["lam"] is None else np.array(state["lam"], dtype=np.float64)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}, rho={self.rho:g}"
