"""GradNorm: learned task weights that equalise the weighted gradient norms, each pulled toward a
target set by the task's relative training rate (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm:
Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018, Sec. 3)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from lightning_cost.aggregators._common import (
    ObservedLosses,
    checkpoint_safe,
    gramian_as_float64,
    real_hparam,
    weights_like,
)
from lightning_cost.aggregators.base import GramianAggregator

__all__ = ["GradNorm"]

_EPS = 1e-8  # guards the loss ratio of a task whose initial loss is 0


class GradNorm(ObservedLosses, GramianAggregator):
    """GradNorm (Chen et al., ICML 2018): ``d = J^T w`` with weights ``w`` learned on the side.

    With ``n_k = ||g_k|| = sqrt(G_kk)``, the weighted norms ``G_k = w_k n_k``, the loss ratios
    ``L~_k = L_k / L_k(0)`` (``L_k(0)``: the first observed losses) and the relative inverse training
    rates ``r_k = L~_k / mean(L~)``, the GradNorm loss is::

        L_grad(w) = sum_k |w_k n_k - mean(G) r_k^alpha|,

    its targets ``mean(G) r_k^alpha`` held constant (as the paper prescribes). Each call returns the
    current ``w``, then takes one plain gradient step with the closed-form gradient
    ``dL_grad/dw_k = sign(w_k n_k - target_k) n_k``, clips ``w`` at 0 and renormalises it to sum ``K``.
    ``w`` starts at ones, so the first update is summing the task gradients.

    Deviations: the paper (and LibMTL) take the norms on the last shared layer's weights; here they
    are the norms of the whole rows of ``J`` (all shared parameters), which the Gramian gives for free.
    LibMTL parametrises ``w = K softmax(s)`` and trains ``s`` with the network's optimizer, from its
    second epoch on, with ``L_k(0)`` the first epoch's mean loss; here ``w`` itself takes a plain step
    of size ``lr`` from the first call, and ``L_k(0)`` is the first step's loss (the paper's choice).
    The step is in the units of the gradient norms (``w_k`` moves by ``lr n_k``): tune ``lr`` to the
    gradients' scale.

    Args:
        alpha: the restoring force's strength, ``>= 0`` (1.5, the paper's and LibMTL's default;
            0 asks for equal weighted norms).
        lr: the weights' step size, ``> 0`` (0.025).

    Needs the task losses (:meth:`observe_losses` before each call; the mixin does it). A task with a
    zero gradient (``n_k = 0``; the mixin hands it in with the others) gets no gradient step, so its
    weight only follows the renormalisation. The weights, ``L(0)`` and the call count are in the
    ``state_dict`` and restart when ``K`` changes. A non-finite Gramian raises ``ValueError``.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        self.alpha = real_hparam("alpha", alpha, 0.0)
        self.lr = real_hparam("lr", lr, 0.0, low_open=True)
        self.state: dict[str, Any] | None = None

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        k = g.shape[0]
        losses = self._losses_for(k).numpy()
        st = self.state
        if st is None or st["weights"].shape[0] != k:
            st = self.state = {"weights": np.ones(k), "initial": losses.copy(), "steps": 0}
        w = st["weights"]
        norms = np.sqrt(np.maximum(g.diagonal(), 0.0))
        weighted = w * norms
        ratio = (losses + _EPS) / (st["initial"] + _EPS)
        targets = weighted.mean() * (ratio / ratio.mean()) ** self.alpha
        new = np.maximum(w - self.lr * np.sign(weighted - targets) * norms, 0.0)
        total = new.sum()
        st["weights"] = new * (k / total) if total > 0.0 else np.ones(k)
        st["steps"] += 1
        return weights_like(w, gramian)

    def get_extra_state(self) -> Any:
        if self.state is None:
            return {"state": None}
        return {"state": checkpoint_safe(self.state)}

    def set_extra_state(self, state: Any) -> None:
        saved = state["state"]
        self.state = None if saved is None else {
            key: np.array(v, dtype=np.float64) if key in ("weights", "initial") else v for key, v in saved.items()}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, lr={self.lr:g}"

