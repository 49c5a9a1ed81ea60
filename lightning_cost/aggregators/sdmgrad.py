"""SDMGrad: MGDA's min-norm direction pulled toward a preferred one, its weights solved by a few warm-started
projected SGD steps (Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable
Stochastic Algorithms", NeurIPS 2023, Algorithm 1 and its Sec. 6.1 normalisation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from lightning_cost.aggregators._common import (
    checkpoint_safe,
    gramian_as_float64,
    int_hparam,
    real_hparam,
    simplex_projection,
    weights_like,
)
from lightning_cost.aggregators.base import GramianAggregator

__all__ = ["SDMGrad"]

_EPS = 1e-8  # added to s^2, as the authors and TorchJD do


class SDMGrad(GramianAggregator):
    """Stochastic Direction-oriented Multi-objective Gradient descent (Xiao, Ban & Ji, NeurIPS 2023).

    With the preferred direction ``g_0 = J^T w_pref`` (the mean gradient by default), SDMGrad seeks
    ``w in simplex`` minimising ``1/2 ||J^T (w + lambda_ w_pref)||^2``: the direction closest to MGDA's
    common descent direction that stays within reach of ``g_0``. Its gradient in ``w`` is
    ``A (w + lambda_ w_pref)``, with ``A = G / s^2`` and ``s`` the mean task-gradient norm (so ``lr`` is
    free of the gradients' scale); ``n_iter`` projected heavy-ball steps, from the previous call's
    ``w`` (``1/K`` at first), give::

        v <- momentum v + A (w + lambda_ w_pref),   w <- Proj_simplex(w - lr v)   (v = 0 at each call)

    and the update is ``d = J^T (w + lambda_ w_pref) / (1 + lambda_)``. Everything is a function of
    ``G``, so SDMGrad runs on the Gramian engine.

    Args:
        lr: the inner steps' size, ``> 0`` (10, the authors' and TorchJD's).
        momentum: the inner steps' momentum, in ``[0, 1)`` (0.5).
        n_iter: inner steps per call, an int ``>= 1`` (20).
        lambda_: the pull toward ``g_0``, ``>= 0`` (0.3, the authors' experiments'; 0: MGDA's
            direction approached by SGD).
        pref_vector: ``w_pref``, ``K`` finite non-negative numbers (``None``: ``1/K`` each).

    The paper draws three independent mini-batches per step (two for an unbiased ``A``); here ``A``
    comes from the one batch's ``J J^T``. As in TorchJD and the authors' code ``A = G / (s^2 + 1e-8)``:
    the weights are unchanged under ``J -> cJ`` only while ``s^2 >> 1e-8`` (an all-zero ``G`` leaves
    ``w`` as it is). With ``lr = 10`` the inner steps overshoot and bounce between faces of the
    simplex, so a tiny change of ``G`` (rounding included) can grow over the calls: compare runs with
    a tolerance. The running ``w`` (float64) is in the ``state_dict``; it restarts at ``1/K`` when the
    number of tasks changes. A non-finite Gramian raises ``ValueError``.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, lr: float = 10.0, momentum: float = 0.5, n_iter: int = 20, lambda_: float = 0.3,
                 pref_vector: Sequence[float] | Tensor | None = None) -> None:
        super().__init__()
        self.lr = real_hparam("lr", lr, 0.0, low_open=True)
        self.momentum = real_hparam("momentum", momentum, 0.0, 1.0, high_open=True)
        self.n_iter = int_hparam("n_iter", n_iter, 1)
        self.lambda_ = real_hparam("lambda_", lambda_, 0.0)
        self.pref_vector: tuple[float, ...] | None = None
        if pref_vector is not None:
            if isinstance(pref_vector, (str, bytes)) or not isinstance(pref_vector, (Sequence, Tensor, np.ndarray)):
                raise TypeError(f"pref_vector must be a sequence of numbers, got {type(pref_vector).__name__}")
            values = pref_vector.tolist() if isinstance(pref_vector, (Tensor, np.ndarray)) else list(pref_vector)
            if np.ndim(values) != 1:
                raise ValueError(f"pref_vector must be one-dimensional, got {pref_vector!r}")
            self.pref_vector = tuple(real_hparam("pref_vector entries", v, 0.0) for v in values)
        self.w: np.ndarray | None = None

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        k = g.shape[0]
        if self.pref_vector is not None and len(self.pref_vector) != k:
            raise ValueError(f"pref_vector has {len(self.pref_vector)} entries for {k} tasks")
        pref = np.full(k, 1.0 / k) if self.pref_vector is None else np.array(self.pref_vector)
        scale = float(np.sqrt(np.maximum(g.diagonal(), 0.0)).mean()) ** 2
        a = g / (scale + _EPS)
        w = np.full(k, 1.0 / k) if self.w is None or self.w.shape != (k,) else self.w
        velocity = np.zeros(k)
        for _ in range(self.n_iter):
            velocity = self.momentum * velocity + a @ (w + self.lambda_ * pref)
            w = simplex_projection(w - self.lr * velocity)
        self.w = w
        return weights_like((w + self.lambda_ * pref) / (1.0 + self.lambda_), gramian)

    def get_extra_state(self) -> Any:
        return checkpoint_safe({"w": self.w})

    def set_extra_state(self, state: Any) -> None:
        self.w = None if state["w"] is None else np.array(state["w"], dtype=np.float64)

    def extra_repr(self) -> str:
        pref = "" if self.pref_vector is None else f", pref_vector={list(self.pref_vector)}"
        return f"lr={self.lr:g}, momentum={self.momentum:g}, n_iter={self.n_iter}, lambda_={self.lambda_:g}{pref}"
