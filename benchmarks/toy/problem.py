"""The toy problem itself: the two losses, the Pareto set and the distance to it, the five inits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

LOWER = 5e-6
#: The Pareto set: ``x1 in PARETO_X1``, ``x2 = PARETO_X2``.
PARETO_X1 = (-7.0, 7.0)
PARETO_X2 = -8.3552
#: Distance (parameter space) below which a point counts as on the Pareto set (see :mod:`benchmarks.toy`).
PARETO_TOL = 0.1
#: The five initialisations of the Nash-MTL / FAMO toy (CAGrad used the 1st, (-8.5, -5) and the 3rd).
INITS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))


def _max(t: Tensor, floor: float) -> Tensor:
    """``max(t, floor)`` whose derivative at ``t == floor`` is 1 (the subgradient ``torch.clamp`` had when the
    papers' code ran: ``where(self >= min, grad, 0)``). torch 2.14's ``clamp`` gives 0 there, which makes
    ``x = (0, 0)`` (``c1 = c2 = 0``, one of the five inits) an exact stationary point of both losses."""
    return torch.where(t >= floor, t, torch.full_like(t, floor))


def toy_losses(x: Tensor, l1_scale: float = 1.0) -> Tensor:
    """``[L1, L2]`` at ``x`` (shape ``[..., 2]`` -> ``[..., 2]``), differentiable; see :mod:`benchmarks.toy`
    for the formulas."""
    x1, x2 = x[..., 0], x[..., 1]
    th = torch.tanh(-x2)
    f1 = _max((0.5 * (-x1 - 7) - th).abs(), LOWER).log() + 6
    f2 = _max((0.5 * (-x1 + 3) + th + 2).abs(), LOWER).log() + 6
    c1 = _max(torch.tanh(x2 * 0.5), 0.0)
    c2 = _max(torch.tanh(-x2 * 0.5), 0.0)
    f1_sq = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    f2_sq = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    l1 = f1 * c1 + f1_sq * c2
    l2 = f2 * c1 + f2_sq * c2
    return torch.stack([l1 * l1_scale, l2], dim=-1)


def pareto_distance(x: Tensor | Sequence[float]) -> Tensor:
    """Euclidean distance from ``x`` (``[..., 2]``) to the segment ``x1 in [-7, 7], x2 = -8.3552``."""
    x = torch.as_tensor(x, dtype=torch.float64).detach()
    dx1 = (x[..., 0].abs() - PARETO_X1[1]).clamp_min(0.0)
    dx2 = x[..., 1] - PARETO_X2
    return torch.sqrt(dx1 * dx1 + dx2 * dx2)


def on_pareto_set(x: Tensor | Sequence[float], tol: float = PARETO_TOL) -> bool | Tensor:
    """Whether ``x`` lies within ``tol`` of the Pareto set (a bool for one point, a mask for ``[..., 2]``)."""
    out = pareto_distance(x) <= tol
    return bool(out) if out.ndim == 0 else out


def init_key(init: Sequence[float]) -> str:
    """An init as the summary's key and the tables' label: ``"(x1, x2)"``."""
    return f"({float(init[0]):g}, {float(init[1]):g})"
