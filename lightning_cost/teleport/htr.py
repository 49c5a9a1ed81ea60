"""Historical trajectory reuse (HTR, paper eqs. 12-13)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["apply_htr", "htr_sigma"]

log = logging.getLogger(__name__)


def htr_sigma(delta: Tensor, grad: Tensor) -> float:
    """``sigma = cos(dtheta, g')`` (eq. 12): the teleport's displacement against the pre-teleport gradient.

    Returns 0.0 when either vector is zero (no information to reuse).
    """
    d, g = delta.double().flatten(), grad.double().flatten()
    denom = d.norm() * g.norm()
    return float((d @ g) / denom) if denom > 0 else 0.0


def apply_htr(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], sigma: float) -> str:
    """Rescale the optimizer's history of ``params`` for the coming step (eq. 13).

    Call it right before the first optimizer step after a teleport, with the step's gradients in
    ``p.grad`` (unscaled). ``sigma`` is clipped to ``[0, 1]``: ``sigma <= 0`` means the jump
    disagrees with the past trajectory and the history is discarded (the authors' code creates
    a fresh Adam in that case); the moments then restart from the coming gradient and can never
    turn negative or NaN.

    * Adam / AdamW: eq. 13 asks for the moment updates ``m_t = s b1 m + (1 - s b1) g`` and
      ``v_t = s b2 v + (1 - s b2) g^2``. Writing ``m <- s m + (1 - s) g`` and
      ``v <- s v + (1 - s) g^2`` before the ordinary step with ``(b1, b2)`` gives exactly these
      values, for these parameters only (heads keep their history) and without touching the
      param group's betas. The bias correction keeps the group's ``(b1, b2)``.
    * SGD with momentum: the buffer ``b`` becomes ``s b``, so the step uses ``s mu b + g``.
    * Any other optimizer: a warning; its state is left as it is.

    Returns which rule was applied (``"adam"``, ``"sgd"``, ``"none"``).
    """
    s = min(max(float(sigma), 0.0), 1.0)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        for p in params:
            state = optimizer.state.get(p)
            if not state or p.grad is None or "exp_avg" not in state:
                continue
            g = p.grad.detach().to(state["exp_avg"].dtype)
            state["exp_avg"].mul_(s).add_(g, alpha=1.0 - s)
            state["exp_avg_sq"].mul_(s).addcmul_(g, g, value=1.0 - s)
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        for p in params:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf.mul_(s)
        return "sgd"
    warnings.warn(
        f"HTR supports Adam, AdamW and SGD; {type(optimizer).__name__}'s state is left unchanged after the teleport",
        stacklevel=2,
    )
    return "none"
