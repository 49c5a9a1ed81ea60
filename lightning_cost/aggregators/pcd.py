"""PCD: priority-constrained descent, the primary task's gradient moved just enough to help the others.

D. Varam, M. I. AlHajri, "Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
Multi-Objective Optimization", arXiv:2606.29521, 2026: min_d 1/2 ||d - g~_1||^2 s.t. g~_j . d >= tau ||g~_j||^2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_cost.aggregators._common import checkpoint_safe, gramian_as_float64, weights_like
from lightning_cost.aggregators.base import AggregationError, GramianAggregator

__all__ = ["PCD"]


class PCD(GramianAggregator):
    """Priority-constrained descent (TorchJD's ``PCD``): task 0 is the primary objective.

    Each gradient is normalised, ``g~_i = g_i / sqrt(v_i + eps)``, by the bias-corrected running
    mean ``v_i`` of ``||g_i||^2`` (decay ``beta``). The direction is the point closest to ``g~_1``
    that gives every secondary task ``j`` at least the fraction ``tau_j`` of the first-order progress
    of a step along its own normalised gradient::

        d~ = argmin_d 1/2 ||d - g~_1||^2   s.t.   g~_j . d >= tau_j ||g~_j||^2   (j = 2..K)

    and ``d`` is ``d~`` rescaled to ``||g_1||``. By the KKT conditions ``d~ = g~_1 + sum_j mu_j g~_j``
    with multipliers ``mu >= 0``, so the QP is solved on the Gramian alone: a dual active-set method
    (Goldfarb & Idnani, Math. Programming 1983, with an identity Hessian) adds the most violated
    constraint at a time, dropping any active one whose multiplier would turn negative.

    Args:
        tau: the guaranteed fraction in ``[0, 1]`` (default 0.02), one float or ``K - 1`` floats.
        beta: the running mean's decay in ``[0, 1)`` (default 0.999).
        eps: added to ``v_i`` before the square root (``>= 0``, default 1e-8).

    Special cases: a zero ``g_1`` gives ``d = 0``; infeasible constraints (e.g. two opposite secondary
    gradients) are dropped and ``d = g_1``; a ``d~`` that is zero up to the Gramian's rounding gives
    ``d = 0``. Not symmetric in the tasks. The running mean and the step count are in the
    ``state_dict`` (restarted when ``K`` changes); a non-finite Gramian raises ``ValueError`` and
    leaves them unchanged (TorchJD returns NaN). A solve that does not settle raises
    :class:`AggregationError`.
    """

    validates_gramian = True  # weights() rejects a non-finite Gramian (gramian_as_float64)

    def __init__(self, tau: float | Sequence[float] = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__()
        taus = [tau] if isinstance(tau, (int, float)) else list(tau) if isinstance(tau, Sequence) else None
        if taus is None or not taus or any(isinstance(t, bool) or not isinstance(t, (int, float)) for t in taus):
            raise TypeError(f"tau must be a float or a sequence of floats, got {tau!r}")
        if not all(0.0 <= t <= 1.0 for t in taus):
            raise ValueError(f"tau must be in [0, 1], got {tau!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not (eps >= 0.0 and math.isfinite(eps)):
            raise ValueError(f"eps must be finite and >= 0, got {eps}")
        self.tau = float(tau) if isinstance(tau, (int, float)) else tuple(float(t) for t in taus)
        self.beta, self.eps = float(beta), float(eps)
        self.sq_norm_mean = np.zeros(0)  # the running mean of ||g_i||^2 (not bias-corrected)
        self.steps = 0

    def _taus(self, k: int) -> np.ndarray:
        if isinstance(self.tau, float):
            return np.full(k - 1, self.tau)
        if len(self.tau) != k - 1:
            raise ValueError(f"PCD has {len(self.tau)} values of tau, one per secondary task, but got K={k} tasks")
        return np.array(self.tau)

    def weights(self, gramian: Tensor) -> Tensor:
        g = gramian_as_float64(gramian)
        k = g.shape[0]
        taus = self._taus(k)
        sq = np.maximum(g.diagonal(), 0.0)
        if self.sq_norm_mean.shape != (k,):
            self.sq_norm_mean, self.steps = np.zeros(k), 0
        self.sq_norm_mean = self.beta * self.sq_norm_mean + (1.0 - self.beta) * sq
        self.steps += 1
        denom = np.sqrt(self.sq_norm_mean / (1.0 - self.beta**self.steps) + self.eps)
        scale = np.divide(1.0, denom, out=np.zeros(k), where=denom > 0.0)  # never seen: its scale is moot
        w = np.zeros(k)
        if sq[0] > 0.0:
            n = g * np.outer(scale, scale)
            precision = 10.0 * float(torch.finfo(gramian.dtype).eps)
            coef = _priority_qp(n, taus, max(1e-9, precision))
            norm_sq = float(coef @ n @ coef)
            rounding = float(np.abs(coef) @ np.sqrt(np.maximum(n.diagonal(), 0.0))) ** 2
            if norm_sq > precision * rounding:
                w = coef * scale * math.sqrt(sq[0] / norm_sq)
        return weights_like(w, gramian)

    def get_extra_state(self) -> Any:
        return checkpoint_safe({"sq_norm_mean": self.sq_norm_mean, "steps": self.steps})

    def set_extra_state(self, state: Any) -> None:
        self.sq_norm_mean = np.array(state["sq_norm_mean"], dtype=np.float64)
        self.steps = int(state["steps"])

    def extra_repr(self) -> str:
        return f"tau={self.tau}, beta={self.beta:g}, eps={self.eps:g}"


def _priority_qp(n: np.ndarray, taus: np.ndarray, dependence: float, tol: float = 1e-9) -> np.ndarray:
    """``[1, mu_2, .., mu_K]``: the coefficients of the QP's solution over the (normalised) gradients
    of Gramian ``n``; ``[1, 0, .., 0]`` if the constraints are infeasible.

    Dual active set: ``mu`` stays dual feasible (``>= 0``, zero off the active set ``act``) and the
    active constraints hold with equality. For a violated constraint ``p`` the primal step is the
    part of ``g_p`` orthogonal to the active gradients; its length in ``mu_p`` is the full step that
    meets ``p``, or shorter where an active multiplier reaches 0 first (that one is dropped). A
    ``g_p`` within the active span (relative squared residual <= ``dependence``) that no active
    multiplier can make room for means the constraints are infeasible.
    """
    k = n.shape[0]
    coef = np.zeros(k)
    coef[0] = 1.0
    s = n[1:, 1:]
    need = taus * s.diagonal() - n[1:, 0]  # constraint j: (s mu)_j >= need_j
    mu = np.zeros(k - 1)
    act: list[int] = []
    slack_tol = tol * max(float(n.diagonal().max()), np.finfo(np.float64).tiny)
    for _ in range(10 * k):
        slack = s @ mu - need
        slack[act] = 0.0
        p = int(slack.argmin())
        if slack[p] >= -slack_tol:
            coef[1:] = np.maximum(mu, 0.0)
            return coef
        while True:  # bring constraint p into the active set
            if act:
                r = np.linalg.solve(s[np.ix_(act, act)], s[act, p])
                resid = s[p, p] - s[p, act] @ r
                blocking = np.where(r > 0.0, mu[act] / np.where(r > 0.0, r, 1.0), np.inf)
                drop = int(blocking.argmin())
                partial = float(blocking[drop])
            else:
                r, resid, partial = np.zeros(0), s[p, p], math.inf
            full = -float(slack[p]) / resid if resid > dependence * s[p, p] else math.inf
            step = min(full, partial)
            if math.isinf(step):
                return coef  # infeasible: g_p cannot be met, and no active constraint gives way
            mu[act] -= step * r
            mu[p] += step
            if full <= partial:
                act.append(p)
                break
            mu[act[drop]] = 0.0
            del act[drop]
            slack[p] = s[p] @ mu - need[p]
    raise AggregationError(f"PCD: the active-set solve did not settle in {10 * k} steps (K={k})")
