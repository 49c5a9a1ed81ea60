"""Historical trajectory reuse (HTR, paper eqs. 12-13)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

__all__ = ["apply_htr", "htr_sigma"]


def htr_sigma(delta: Tensor, grad: Tensor) -> float:
    """``sigma = cos(dtheta, g')`` (eq. 12): the teleport's displacement against the pre-teleport gradient.

    Returns 0.0 when either vector is zero (no information to reuse).
    """
    d, g = delta.double().flatten(), grad.double().flatten()
    denom = d.norm() * g.norm()
    return float((d @ g) / denom) if denom > 0 else 0.0


def apply_htr(
    optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], sigma: float, bias_corrected: bool = True
) -> str:
    """Rescale the optimizer's history of ``params`` for the coming step (eq. 13).

    Call it right before the first optimizer step after a teleport, with the step's gradients in
    ``p.grad`` (unscaled). ``sigma`` is clipped to ``[0, 1]``: ``sigma <= 0`` means the jump
    disagrees with the past trajectory and the history is discarded (the authors' code creates a
    fresh Adam then); the moments restart from the coming gradient and never turn negative or NaN.

    * Adam / AdamW (:func:`_htr_adam`): eq. 13's moments for these parameters only (heads keep their
      history), without touching the param group's betas.
    * SGD with momentum: the buffer ``b`` becomes ``s b``, so the step uses ``s mu b + g``.
    * Any other optimizer: a warning; its state is left unchanged.

    Returns which rule was applied (``"adam"``, ``"sgd"``, ``"none"``).
    """
    s = min(max(float(sigma), 0.0), 1.0)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        _htr_adam(optimizer, params, s, bias_corrected)
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        for p in params:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf.mul_(s)
        return "sgd"
    rank_zero_warn(
        f"HTR supports Adam, AdamW and SGD; {type(optimizer).__name__}'s state is left unchanged after the teleport"
    )
    return "none"


@torch.no_grad()
def _htr_adam(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], s: float, bias_corrected: bool) -> None:
    """Eq. 13 on Adam's moments: ``m_t = s b1 m + (1 - s b1) g``, ``v_t = s b2 v + (1 - s b2) g^2``.

    ``bias_corrected=False`` writes ``m <- s m + (1 - s) g`` (and likewise ``v``) before the ordinary
    step with ``(b1, b2)``: the raw moments are exactly eq. 13's, but Adam still divides them by
    ``1 - b^(t+1)``, which assumes an average started from zero, while eq. 13's moments have total
    weight ``M = 1 - s b^(t+1)``, close to 1 even early in training; ``v_hat`` is then inflated by
    ``M / (1 - b2^(t+1))`` and every later step of these weights shrinks for hundreds of steps.

    ``bias_corrected=True`` applies eq. 13 to the *bias-corrected* moments: after the step Adam's
    ``m_hat`` is eq. 13's ``m_t`` over its own total weight ``M = 1 - s b1^(t+1)``. Solving for the
    stored moment: ``m <- (s (1 - b1^(t+1)) m + (1 - s) (1 - b1^t) g) / (1 - s b1^(t+1))`` (non-negative
    weights; no division by ``b``, so ``b1 = 0`` works). For ``t -> inf`` (the paper's 200-epoch runs)
    this is the raw rule; ``s = 1`` leaves the state untouched; ``s = 0`` gives ``m_hat = g``,
    ``v_hat = g^2``, the first step of a fresh Adam. ``amsgrad``'s running maximum is left as it is.
    """
    betas = {id(p): group["betas"] for group in optimizer.param_groups for p in group["params"]}
    for p in params:
        state = optimizer.state.get(p)
        if not state or p.grad is None or "exp_avg" not in state:
            continue
        g = p.grad.detach().to(state["exp_avg"].dtype)
        if not bias_corrected:
            state["exp_avg"].mul_(s).add_(g, alpha=1.0 - s)
            state["exp_avg_sq"].mul_(s).addcmul_(g, g, value=1.0 - s)
            continue
        t = float(state["step"])
        b1, b2 = (float(b) for b in betas[id(p)])
        for key, b, x in (("exp_avg", b1, g), ("exp_avg_sq", b2, g * g)):
            mass = 1.0 - s * b ** (t + 1)  # total weight of eq. 13's moment after the step
            state[key].mul_(s * (1.0 - b ** (t + 1)) / mass).add_(x, alpha=(1.0 - s) * (1.0 - b**t) / mass)
